"""grain worker processes (num_workers > 0) give the same batches and resume exactly."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_worker_processes_match_threads_and_resume(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(f"paragraph {i} " * (1 + i % 9) for i in range(500)))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.data.workers_main", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict = json.loads(proc.stdout.strip().splitlines()[-1])
    assert verdict == {"same_as_threads": True, "resumed": True}
