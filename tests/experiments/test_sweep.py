"""`python -m experiments.sweep`: a 2 x 2 grid killed in the middle and re-run trains each point once
and gives the complete table; a failing point is recorded and the sweep goes on."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import configs
from nl_jax.sweep import grid, make_plan, results, run_local, state
from nl_jax.train.checkpoint import checkpoint_files
from tests.train import tiny

pytestmark = pytest.mark.e2e

# tests/train/tiny.py's model with one layer, batches of 4 and evaluation at the end only.
BASE = {k: v for k, v in tiny.OVERRIDES.items() if k != "optim.lr"}  # the grid sweeps the lr
BASE.update(
    {
        "model.num_layers": 1,
        "data.global_batch_size": 4,
        "train.steps": 20,
        "train.log_every": 5,
        "eval.every": 0,
        "eval.max_batches": 1,
        "checkpoint.every": 10,
    }
)
GRID = ["config.optim.lr=1e-3,3e-3", "config.train.seed=0,1"]
POINTS = ["lr=0.001__seed=0", "lr=0.001__seed=1", "lr=0.003__seed=0", "lr=0.003__seed=1"]


def _env(cache_dir) -> dict:
    env = tiny.pretrain_env(1)
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # what tests/train/conftest.py sets in-process
    # Points share programs (a seed changes only the init, an lr only the train step) and a resumed
    # point recompiles its own: a compilation cache saves about a third of the test's time.
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def _sweep_cmd(root) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.sweep",
        "--config=transformer_tiny",
        f"--workdir={root}",
        *(f"--grid={g}" for g in GRID),
        *(f"--config.{k}={v}" for k, v in BASE.items()),
    ]


def _starts(root) -> dict:
    out = {}
    for e in state.events(str(root)):
        if e["event"] == "start":
            out[e["point"]] = out.get(e["point"], 0) + 1
    return out


def test_killed_sweep_reruns_to_the_full_table_training_each_point_once(tmp_path):
    root = tmp_path / "sweep"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        _sweep_cmd(root),
        cwd=tiny.ROOT,
        env=_env(tmp_path / "jax_cache"),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    # Kill the sweep and its running point (SIGKILL, no clean-up) once point 1 has finished and
    # point 2 has written a checkpoint.
    deadline = time.time() + 240
    while not (_starts(root).get(POINTS[1]) and checkpoint_files(str(root / POINTS[1]))):
        assert first.poll() is None, open(tmp_path / "first.log").read()[-3000:]
        assert time.time() < deadline, "point 2 never wrote a checkpoint"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (root / POINTS[1] / "summary.json").exists(), (
        "point 2 finished before the kill: raise train.steps"
    )
    assert (root / POINTS[0] / "summary.json").exists() and not (root / POINTS[2]).exists()
    done_first = os.path.getmtime(root / POINTS[0] / "summary.json")

    again = subprocess.run(
        _sweep_cmd(root),
        cwd=tiny.ROOT,
        env=_env(tmp_path / "jax_cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"[1/4 {POINTS[0]}] finished before: skipped" in again.stdout

    # Each point trained once: one start each, two for the killed one, which resumed from its checkpoint.
    assert _starts(root) == {POINTS[0]: 1, POINTS[1]: 2, POINTS[2]: 1, POINTS[3]: 1}
    assert os.path.getmtime(root / POINTS[0] / "summary.json") == done_first
    resumed = json.loads((root / POINTS[1] / "summary.json").read_text())
    assert resumed["start_step"] >= 10 and resumed["final_step"] == 20

    rows = list(csv.DictReader(open(root / "results.csv")))
    assert [r["point"] for r in rows] == POINTS
    assert [(r["optim.lr"], r["train.seed"]) for r in rows] == [
        ("0.001", "0"),
        ("0.001", "1"),
        ("0.003", "0"),
        ("0.003", "1"),
    ]
    for r in rows:
        assert r["status"] == "finished" and r["steps"] == "20/20", r
        assert math.isfinite(float(r["final_eval_loss"])) and float(r["final_eval_loss"]) < math.log(260)
        assert float(r["tokens_per_s"]) > 0 and int(r["params"]) == int(rows[0]["params"]) > 0
    md = (root / "results.md").read_text()
    assert md.count("| finished |") == 4 and "`python -m experiments.sweep --config=transformer_tiny" in md
    for png in ("loss_curves.png", "final_eval_loss.png"):
        assert (root / png).read_bytes()[:4] == b"\x89PNG"


def test_failed_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    """grad_accum_steps=3 does not divide the batch of 4: that point exits with an error, the next
    one trains and is evaluated; a re-run skips the failure unless asked to retry it."""
    base = {**BASE, "train.steps": 2, "checkpoint.every": 0}
    cfg = configs.load("transformer_tiny")
    for k, v in base.items():
        grid.set_field(cfg, k, v)
    plan = make_plan(
        "transformer_tiny",
        cfg,
        base,
        grid_flags=["train.grad_accum_steps=3,1"],
        root=str(tmp_path / "sw"),
        eval_suite="lm",
        eval_args=["--limit=1", "--batch_size=1"],
    )
    bad, good = (p.name for p in plan.points)
    lines = []
    run = dict(echo=False, env=_env(tmp_path / "jax_cache"), log=lines.append)
    out = run_local(plan, **run)
    assert out.statuses == {bad: "failed", good: "finished"} and out.failed == [bad]
    evts = state.events(plan.root)
    failure = state.last_outcome(evts, bad)
    assert failure["rc"] == 2 and "grad_accum_steps=3 must be >= 1 and divide" in failure["error"]
    assert [e["event"] for e in evts if e["point"] == good] == ["start", "eval", "finished"]
    (row,) = [r for r in results.rows(plan) if r["point"] == good]
    assert row["validation ppl"] > 1 and row["final_eval_loss"] > 0

    out = run_local(plan, **run)  # nothing to do: the evaluation is found too
    assert out.statuses == {bad: "failed", good: "finished"} and len(state.events(plan.root)) == len(evts)
    assert any("failed before" in ln and "--retry_failed" in ln for ln in lines)
    out = run_local(plan, retry_failed=True, **run)
    assert out.statuses[bad] == "failed" and _starts(plan.root) == {bad: 2, good: 1}
