"""`python -m experiments.pretrain` killed at several points (SIGKILL during an async save, SIGKILL
between saves, SIGTERM) and run again with the same command each time ends exactly where an
uninterrupted run ends: the same metrics.jsonl, one row per logged step, bit for bit on CPU apart
from the timing fields."""

import os
import signal
import time

import pytest

from nl_jax.metrics import read_jsonl
from nl_jax.train.checkpoint import checkpoint_files
from tests.train.tiny import run_cli, start_cli

pytestmark = pytest.mark.e2e

# Long enough that the kills land mid-run; checkpoints every 10 steps, rows every 5, eval every 20.
LONG = dict(train__steps=60, checkpoint__every=10, eval__every=20, train__log_every=5)
TIMING = {"time", "tokens_per_s", "step_time_s", "eta_s", "mfu"}


def _rows(workdir) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same command, never interrupted (a subprocess too: a process with 8 fake devices may
    order float reductions differently from one with 1)."""
    wd = tmp_path_factory.mktemp("full")
    proc = run_cli(wd, **LONG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _rows(wd)


def _fail(proc, why):
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"{why} (rc {proc.returncode}):\n{err[-3000:]}")


def _wait_for_checkpoint(proc, workdir, step, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            _fail(proc, f"run ended before checkpoint {step}")
        if any(int(s) >= step for s in checkpoint_files(str(workdir))):
            return
        time.sleep(0.02)
    _fail(proc, f"no checkpoint {step} after {timeout}s")


def _saves_in_flight(workdir) -> list[str]:
    d = os.path.join(workdir, "checkpoints")
    return [n for n in os.listdir(d) if "tmp" in n] if os.path.isdir(d) else []


def _kill_during_a_save(proc, workdir, timeout=180):
    """SIGKILL while orbax writes a checkpoint (its temporary directory exists): the process is
    stopped first, so the directory is seen to be still there when the kill lands."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            _fail(proc, "run ended before a save could be interrupted")
        if _saves_in_flight(workdir):
            proc.send_signal(signal.SIGSTOP)
            if _saves_in_flight(workdir):
                proc.kill()
                proc.communicate()
                return
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    _fail(proc, f"no save in flight seen in {timeout}s")


def test_killed_three_times_the_run_ends_with_an_uninterrupted_runs_metrics(tmp_path, uninterrupted):
    wd = tmp_path / "run"

    # 1. SIGKILL during an async save (a save every step, so one is nearly always in flight).
    proc = start_cli(wd, **{**LONG, "checkpoint__every": 1})
    _wait_for_checkpoint(proc, wd, 5)
    _kill_during_a_save(proc, wd)
    assert proc.returncode == -signal.SIGKILL

    # 2. SIGKILL between saves, after the restored run wrote a checkpoint of its own.
    proc = start_cli(wd, **LONG)
    _wait_for_checkpoint(proc, wd, 20)
    proc.kill()
    proc.communicate()

    # 3. SIGTERM: a save at the step where the signal arrived (rarely a logged step, so the rows
    #    after the resume average steps from both sides of it), then a clean stop with 128 + 15.
    proc = start_cli(wd, **LONG)
    _wait_for_checkpoint(proc, wd, 30)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    stopped = int(out.split("preempted: saved step ")[1].split(";")[0])
    assert 30 <= stopped < 60 and stopped in [int(s) for s in checkpoint_files(str(wd))]

    again = run_cli(wd, **LONG)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from checkpoint step {stopped}/60" in again.stdout
    rows = _rows(wd)
    assert [(r["split"], r["step"]) for r in rows] == [(r["split"], r["step"]) for r in uninterrupted]
    assert rows == uninterrupted
