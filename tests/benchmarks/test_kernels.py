"""benchmarks.kernels: on CPU it refuses without --allow_interpret (interpret mode is no speed
measurement), and with it prints one row per rule, length, width and pass (a subprocess: the
benchmark defines absl flags). benchmarks.triton_params refuses anywhere but on a GPU."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

CMD = [sys.executable, "-m", "benchmarks.kernels"]


def test_kernels_refuses_on_cpu_and_smoke_runs_every_rule():
    refused = subprocess.run(CMD, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "refused on CPU" in refused.stdout
    args = "--allow_interpret --lengths=32 --head_dims=8 --batch=1 --heads=1 --chunk=16 --reps=1".split()
    proc = subprocess.run(CMD + args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rules = ("gated_delta", "titans_linear", "titans_mlp")
    rows = [row for row in map(str.split, proc.stdout.splitlines()) if row[:1] and row[0] in rules]
    want = sorted((rule, p) for rule in rules for p in ("fwd", "fwd+bwd"))
    assert sorted((r[0], r[3]) for r in rows) == want
    assert all(float(r[-1]) > 0 for r in rows)  # xla time / pallas time
    bad = subprocess.run(
        CMD + ["--allow_interpret", "--rules=nope"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0 and "unknown ['nope']" in bad.stderr


def test_triton_params_refuses_off_gpu():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.triton_params"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1 and "Triton runs on GPU only; this backend is cpu" in proc.stdout
