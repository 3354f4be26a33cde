"""benchmarks.step_profile on a small transformer: it times the step, reads the trace's kernels and
splits their time and the bytes they write by kind, by pass and by part of the model (subprocesses:
the benchmark defines absl flags)."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_profile_reports_kernels_by_kind_and_pass():
    args = ["--config=transformer_tiny", "--override=model.num_layers=1", "--batch=2", "--seq_len=32"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_profile", *args, "--repeats=1", "--top=3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"step \d+ ms \([\d,]+ tokens/s\)", out)
    n = int(re.search(r"([\d,]+) kernels, ", out).group(1).replace(",", ""))
    assert n > 10
    floor, floor_ms = re.search(r"kernel floor: ([\d.]+) us per kernel .*, ([\d,]+) ms for", out).groups()
    assert 0 < float(floor) < 1000 and abs(int(floor_ms.replace(",", "")) - n * float(floor) / 1e3) <= 1
    assert re.search(r"host: [\d,]+ page faults and [\d,]+ ms of kernel time per step \(GLIBC_TUNABLES=", out)
    mb, rate, host = re.search(
        r"written: ([\d.,]+) MB by the step's kernels, ([\d.]+) GB/s .* writes ([\d.]+) GB/s", out
    ).groups()
    mb = float(mb.replace(",", ""))
    assert mb > 0 and float(rate) > 0 and float(host) > 0
    # the kinds' and the parts' bytes add up to the total (each printed to 0.1 MB)
    kinds = [float(x.replace(",", "")) for x in re.findall(r"kernels +([\d.,]+) MB written", out)]
    assert len(kinds) >= 3 and abs(sum(kinds) - mb) <= 0.1 * len(kinds)
    assert "matmul" in out and "outer backward" in out and "forward (with any inner backward)" in out
    shares = [float(x) for x in re.findall(r"ms +([\d.]+)% ", out.split("by pass:")[0])]
    assert abs(sum(shares) - 100) < 0.5  # the kinds partition the kernel time
    parts = out.split("by part")[1].split("top ")[0]
    assert re.search(r"\n  mixer ", parts) and re.search(r"\n  mlp ", parts)
    assert abs(sum(float(x) for x in re.findall(r"ms +([\d.]+)% ", parts)) - 100) < 0.5  # and the parts
    part_mb = [float(x.replace(",", "")) for x in re.findall(r"kernels +([\d.,]+) MB", parts)]
    assert len(part_mb) >= 4 and abs(sum(part_mb) - mb) <= 0.1 * len(part_mb)
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(
            [sys.executable, "-m", "benchmarks.step_profile", "--override=model.no_such_field=1"],
            capture_output=True,
            check=True,
            timeout=300,
        )


def test_written_bytes_counts_results_and_one_slice_of_an_in_place_update():
    code = (
        "from benchmarks.step_profile import written_bytes as w;"
        "print(w('add_fusion', 'f32[8,16]{1,0}'), w('fusion.1', '(f32[2]{0}, s32[], bf16[3,2])'),"
        " w('slice_dynamic-update-slice_fusion.3', 'f32[16,8,4]{2,1,0}'), w('copy.2', 'pred[5]'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(8 * 16 * 4), str(2 * 4 + 4 + 3 * 2 * 2), str(8 * 4 * 4), "5"]
