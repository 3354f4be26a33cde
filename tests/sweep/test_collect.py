"""The results table and plots from point workdirs written by hand (no training), point statuses, and
the print and launch modes (launch/ scripts in dry-run mode, with a gcloud that fails if called)."""

import csv
import io
import json
import os
import shlex
import stat

import pytest

from experiments import configs
from nl_jax.sweep import launch_commands, make_plan, point_status, print_commands, run_launch
from nl_jax.sweep import results, state
from tests.train.tiny import ROOT


def _plan(root):
    cfg = configs.load("transformer_tiny")
    return make_plan(
        "transformer_tiny", cfg, {}, grid_flags=["optim.lr=1e-3,3e-3", "train.seed=0,1"], root=str(root)
    )


def _write_point(root, name, *, steps, final, losses, eval_results=None):
    d = root / name
    d.mkdir(parents=True)
    summary = {
        "params": 1234,
        "start_step": 0,
        "final_step": steps if final else steps // 2,
        "total_steps": steps,
        "preempted": False,
        "final_train_loss": losses[-1],
        "final_eval_loss": losses[-1] + 0.1,
        "best_eval_loss": losses[-1] + 0.05,
        "tokens_per_s": 1000.0,
        "wall_time_s": 3.0,
    }
    (d / "summary.json").write_text(json.dumps(summary))
    rows = [{"step": 10 * (i + 1), "split": "train", "loss": v} for i, v in enumerate(losses)]
    rows.append({"step": 10, "split": "train", "loss": 9.0})  # a resumed run re-logs step 10: last one wins
    rows.append({"step": 10 * len(losses), "split": "eval", "loss": losses[-1] + 0.1})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "spl')
    if eval_results:
        (d / "eval" / "step_4").mkdir(parents=True)
        (d / "eval" / "step_4" / "eval_results.json").write_text(json.dumps(eval_results))


def test_table_statuses_and_plots(tmp_path):
    root = tmp_path / "sw"
    plan = _plan(root)
    a, b, c, d = (p.name for p in plan.points)
    steps = plan.steps[a]
    lm = {"meta": {"step": 4}, "lm": {"validation": {"perplexity": 7.5, "bits_per_byte": 2.9, "loss": 2.0}}}
    _write_point(root, a, steps=steps, final=True, losses=[3.0, 2.5], eval_results=lm)
    _write_point(root, b, steps=steps, final=False, losses=[3.1])  # interrupted: summary of a half run
    state.record(str(root), b, "start")
    state.record(str(root), c, "start")
    state.record(str(root), c, "failed", rc=3, error="error: non-finite loss")
    assert [point_status(plan, p.name) for p in plan.points] == [
        "finished",
        "incomplete",
        "failed",
        "pending",
    ]

    out = results.collect(plan, header="# my sweep")
    table = out["table"]
    assert [r["point"] for r in table] == [a, b, c, d]
    assert table[0]["optim.lr"] == "0.001" and table[2]["train.seed"] == "0"
    assert table[0]["final_eval_loss"] == pytest.approx(2.6) and table[0]["validation ppl"] == 7.5
    assert table[2]["error"] == "error: non-finite loss" and table[0]["error"] == ""
    md = open(out["markdown_path"]).read()
    assert md.startswith("# my sweep\n| point | optim.lr | train.seed | status | steps |")
    assert (
        f"| {a} | 0.001 | 0 | finished | {steps}/{steps} | 2.5000 | 2.6000 | 2.5500 | 1,000 | 1,234 |" in md
    )
    rows = list(csv.DictReader(io.StringIO(open(out["csv_path"]).read())))
    assert [r["status"] for r in rows] == ["finished", "incomplete", "failed", "pending"]
    assert float(rows[0]["validation bpb"]) == 2.9 and rows[3]["final_eval_loss"] == ""
    for key in ("loss_curves", "metric_plot"):
        assert open(out[key], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert results._curves(plan, a)["train"] == [(10, 9.0), (20, 2.5)]  # deduped, cut line skipped
    with pytest.raises(ValueError, match="--metric='nope' is not a column"):
        results.collect(plan, metric="nope")


@pytest.fixture
def launch_env(tmp_path):
    """A fake gcloud first on PATH that records its arguments and exits with $FAKE_GCLOUD_RC."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gcloud_calls"
    fake = bin_dir / "gcloud"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{calls}"\nexit "${{FAKE_GCLOUD_RC:-0}}"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {
        k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "PROJECT", "DRY_RUN", "RUN_NAME")
    }
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env, calls


def test_print_and_launch_modes(tmp_path, launch_env, capsys):
    env, calls = launch_env
    root = tmp_path / "sw"
    plan = _plan(root)
    first = plan.points[0]
    _write_point(root, first.name, steps=plan.steps[first.name], final=True, losses=[3.0])
    lines = print_commands(plan)
    assert lines[0] == f"# finished: {first.name}"
    assert shlex.split(lines[1]) == ["python", *plan.pretrain_args(plan.points[1])]
    assert "--config.optim.lr=0.001 --config.train.seed=1" in lines[1]

    # One slice: the points run in turn, each attached (--foreground), finished ones left out.
    launcher = os.path.join(ROOT, "launch", "run.sh") + " --name abl --zone us-east5-a"
    cmds = launch_commands(plan, launcher)
    assert [n for n, _ in cmds] == [p.name for p in plan.points[1:]]
    name, argv = cmds[0]
    assert argv[-len(plan.pretrain_args(plan.points[1])) - 3 :][:3] == ["--foreground", "--", "python"]
    assert argv[argv.index("--run-name") + 1] == "lr_0.001__seed_1"

    # Dry run: the scripts print the gcloud lines, gcloud is not called, nothing is recorded.
    out = run_launch(plan, launcher + " --dry-run", env=env, log=lambda *_: None)
    printed = capsys.readouterr().out.split(
        "gcloud compute tpus tpu-vm ssh abl --zone=us-east5-a --worker=all"
    )
    assert len(printed) == 4 and printed[0] == ""  # one gcloud line per point, with its remote script
    assert f"--workdir={root}/{plan.points[3].name}" in printed[3] and "--config.train.seed=1" in printed[3]
    assert not calls.exists() and state.events(str(root)) == []

    # Launched for real (gcloud faked): each start and launch is recorded.
    out = run_launch(plan, launcher, env=env, log=lambda *_: None)
    assert set(out.statuses.values()) == {"launched"}
    gcloud = calls.read_text().splitlines()
    assert gcloud[0].startswith("compute tpus tpu-vm ssh abl --zone=us-east5-a --worker=all --command=")
    assert sum(ln.startswith("compute tpus") for ln in gcloud) == 3
    assert [e["event"] for e in state.events(str(root))] == ["start", "launched"] * 3
    assert point_status(plan, plan.points[1].name) == "launched"

    # {index}: a slice per point, detached.
    cmds = launch_commands(plan, launcher.replace("--name abl", "--name abl-{index}"))
    assert [argv[argv.index("--name") + 1] for _, argv in cmds] == ["abl-1", "abl-2", "abl-3"]
    assert all("--foreground" not in argv for _, argv in cmds)

    # A launch that fails is recorded, and the others still go; a re-run skips the failures.
    out = run_launch(plan, launcher, env={**env, "FAKE_GCLOUD_RC": "97"}, log=lambda *_: None)
    assert set(out.statuses.values()) == {"failed"} and len(out.statuses) == 3
    assert state.last_outcome(state.events(str(root)), plan.points[1].name)["rc"] == 97
    out = run_launch(plan, launcher, env=env, log=lambda *_: None)
    assert set(out.statuses.values()) == {"failed"}
    assert sum(ln.startswith("compute tpus") for ln in calls.read_text().splitlines()) == 6  # none again
