"""`python -m experiments.pretrain` killed by SIGTERM or SIGKILL, then run again with the same
command, ends exactly (bit for bit on CPU) where an uninterrupted run ends."""

import os
import signal
import time

import pytest

from nl_jax.metrics import read_jsonl
from nl_jax.train.checkpoint import checkpoint_files
from tests.train.tiny import run_cli, start_cli

# Long enough that the kill lands mid-run; checkpoints every 10 steps, eval only at the end.
LONG = dict(train__steps=60, checkpoint__every=10, eval__every=0, train__log_every=5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same command, never interrupted (a subprocess too: a process with 8 fake devices may
    order float reductions differently from one with 1)."""
    wd = tmp_path_factory.mktemp("full")
    proc = run_cli(wd, **LONG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_jsonl(os.path.join(wd, "metrics.jsonl"))


def _wait_for_checkpoint(proc, workdir, step, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"run ended (rc {proc.returncode}) before checkpoint {step}:\n{err[-3000:]}")
        if any(int(s) >= step for s in checkpoint_files(str(workdir))):
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no checkpoint {step} after {timeout}s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_run_resumes_to_the_same_final_loss(tmp_path, uninterrupted, sig):
    wd = tmp_path / "run"
    proc = start_cli(wd, **LONG)
    _wait_for_checkpoint(proc, wd, 10)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        # A save at the step where the signal arrived, then a clean stop with 128 + 15.
        assert proc.returncode == 143, err[-3000:]
        assert "preempted: saved step" in out
        stopped = int(out.split("preempted: saved step ")[1].split(";")[0])
        assert stopped in [int(s) for s in checkpoint_files(str(wd))]
    else:
        assert proc.returncode == -signal.SIGKILL
    assert 10 <= max(int(s) for s in checkpoint_files(str(wd))) < 60

    again = run_cli(wd, **LONG)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from checkpoint step" in again.stdout
    rows = read_jsonl(os.path.join(wd, "metrics.jsonl"))
    final_train = [r for r in rows if r["split"] == "train" and r["step"] == 60][-1]
    final_eval = [r for r in rows if r["split"] == "eval" and r["step"] == 60][-1]
    full = uninterrupted
    assert final_eval["loss"] == [r for r in full if r["split"] == "eval" and r["step"] == 60][-1]["loss"]
    assert final_train["loss"] == [r for r in full if r["split"] == "train" and r["step"] == 60][-1]["loss"]
