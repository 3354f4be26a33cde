"""benchmarks.linear_layout on a small shape: both forms give the same gradients and the ratio is
printed (a subprocess: the benchmark defines absl flags)."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_layout_benchmark_compares_equal_gradients():
    args = ["--batch=2", "--seq_len=16", "--d_model=8", "--hidden=24", "--reps=2"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.linear_layout", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert float(re.search(r"max relative gap of the gradients ([\d.e+-]+)", out).group(1)) < 1e-5
    assert re.search(r"dot_general +best +[\d.]+ ms", out) and re.search(r"rows +best +[\d.]+ ms", out)
    assert re.search(r"rows / dot_general speed: [\d.]+x", out)
