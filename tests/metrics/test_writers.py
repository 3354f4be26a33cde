"""Metric writers: TensorBoard event files (tensorboardX, read back by TensorBoard's loader), JSON
lines, and Weights & Biases in its offline mode."""

import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nl_jax.metrics import MetricWriter, TensorBoardWriter, plot_loss_curve, read_events, read_jsonl
from nl_jax.train.loop import check_config
from tests.train.tiny import tiny_config


def test_tensorboard_writer_round_trip(tmp_path):
    w = TensorBoardWriter(str(tmp_path))
    for step in (1, 2, 1000):
        w.write_scalars(step, {"loss": 1.0 / step, "lr": 3e-4, "note": "not a scalar"})
    w.close()
    events = read_events(w.path)
    assert events[0]["scalars"] == {}  # the file_version header event
    assert [e["step"] for e in events[1:]] == [1, 2, 1000]
    assert events[-1]["scalars"] == {"loss": pytest.approx(1e-3), "lr": pytest.approx(3e-4)}
    again = TensorBoardWriter(str(tmp_path))  # a second writer in the same second: its own file
    again.close()
    assert again.path != w.path and len(os.listdir(tmp_path)) == 2


def test_metric_writer_jsonl_tensorboard_and_png(tmp_path):
    w = MetricWriter(str(tmp_path))
    for step in range(0, 50, 10):
        w.write(step, "train", {"loss": 5.0 - step / 10, "mfu": 0.1})
    w.write(40, "eval", {"loss": 1.5})
    w.close()
    rows = read_jsonl(w.jsonl_path)
    assert [(r["split"], r["step"]) for r in rows][-2:] == [("train", 40), ("eval", 40)]
    assert sorted(os.listdir(tmp_path / "tensorboard")) == ["eval", "train"]
    png = plot_loss_curve(rows, str(tmp_path / "curve.png"), "t")
    assert open(png, "rb").read(4) == b"\x89PNG"
    assert plot_loss_curve([], str(tmp_path / "none.png")) is None


def test_an_enabled_writer_imports_tensorboardx_when_built_not_at_its_first_row(tmp_path):
    """The trainer times its steps from the first; the import (about 1 s where torch is installed)
    must not fall into the step that writes the first row. A fresh process: this one has imported it."""
    probe = (
        "import sys; from nl_jax.metrics import MetricWriter; "
        "before = 'tensorboardX' in sys.modules; "
        f"MetricWriter({str(tmp_path / 'off')!r}, enabled=False); off = 'tensorboardX' in sys.modules; "
        f"MetricWriter({str(tmp_path / 'on')!r}); print(before, off, 'tensorboardX' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "True"], out.stderr[-2000:]


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricWriter(str(tmp_path / "x"), enabled=False)
    w.write(1, "train", {"loss": 1.0})
    w.close()
    assert not os.path.exists(tmp_path / "x" / "metrics.jsonl")


def test_rows_are_on_disk_as_soon_as_they_are_written(tmp_path):
    w = MetricWriter(str(tmp_path))
    w.write(2, "train", {"loss": 1.0})
    # Read before close, as after a SIGKILL: the row and its TensorBoard event are there.
    assert [r["step"] for r in read_jsonl(w.jsonl_path)] == [2]
    (name,) = os.listdir(tmp_path / "tensorboard" / "train")
    events = read_events(str(tmp_path / "tensorboard" / "train" / name))
    assert [e["scalars"] for e in events if e["scalars"]] == [{"loss": 1.0}]
    w.close()


def test_a_resumed_writer_supersedes_the_rows_it_logs_again(tmp_path):
    w = MetricWriter(str(tmp_path))
    for step in (0, 2, 4, 6):
        w.write(step, "train", {"loss": float(step)})
        if step == 4:
            w.write(4, "eval", {"loss": 0.5})
    w.close()
    with open(w.jsonl_path, "a") as f:
        f.write('{"step": 8, "split": "tr')  # a write cut short by a kill
    assert [r["step"] for r in read_jsonl(w.jsonl_path)] == [0, 2, 4, 4, 6]

    resumed = MetricWriter(str(tmp_path), resume_step=4)  # restored from checkpoint 4
    assert [(r["split"], r["step"]) for r in read_jsonl(w.jsonl_path)] == [
        ("train", 0),
        ("train", 2),
        ("train", 4),
        ("eval", 4),
    ]
    resumed.write(6, "train", {"loss": 6.5})
    resumed.close()
    assert [r["loss"] for r in read_jsonl(w.jsonl_path)][-1] == 6.5
    moved = open(tmp_path / "metrics_superseded.jsonl").read().splitlines()
    assert [line[:30] for line in moved] == ['{"step": 6, "split": "train", ', '{"step": 8, "split": "tr']
    # TensorBoard drops the older events from the step of a session START on.
    tb = tmp_path / "tensorboard" / "train"
    events = [e for name in sorted(os.listdir(tb)) for e in read_events(str(tb / name))]
    assert [e["step"] for e in events if e["session_start"]] == [0, 5]
    shown = EventAccumulator(str(tb))
    shown.Reload()
    assert [(e.step, e.value) for e in shown.Scalars("loss")] == [(0, 0.0), (2, 2.0), (4, 4.0), (6, 6.5)]

    # A complete last row that only lacks its newline is kept, and the next row starts a new line.
    with open(w.jsonl_path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        f.truncate()
    again = MetricWriter(str(tmp_path), resume_step=6)
    again.write(8, "train", {"loss": 8.0})
    again.close()
    assert [r["step"] for r in read_jsonl(w.jsonl_path)] == [0, 2, 4, 4, 6, 8]


def test_a_fresh_writer_supersedes_every_older_row(tmp_path):
    w = MetricWriter(str(tmp_path))
    w.write(0, "eval", {"loss": 5.0})
    w.close()
    MetricWriter(str(tmp_path), resume_step=0).close()
    assert read_jsonl(w.jsonl_path) == []
    assert len(read_jsonl(str(tmp_path / "metrics_superseded.jsonl"))) == 1


def test_wandb_writer_offline_logs_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's capture of stdout alone
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing under $HOME
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    w = MetricWriter(str(tmp_path), wandb_project="nl-jax-test", run_config={"model": {"d": 8}}, run_name="t")
    run = w.wandb.run
    assert run.offline and run.project == "nl-jax-test" and run.name == "t"
    assert run.config["model"] == {"d": 8}
    w.write(0, "train", {"loss": 5.0, "lr": 1e-3})
    w.write(0, "eval", {"loss": 4.5})
    w.write(2, "train", {"loss": 3.0})  # W&B commits a step's row when the next step begins
    assert {k: run.summary[k] for k in ("train/loss", "eval/loss", "_step")} == {
        "train/loss": 5.0,
        "eval/loss": 4.5,
        "_step": 0,
    }
    w.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert run_id == run.id
    assert any(name.endswith(f"-{run_id}") for name in os.listdir(tmp_path / "wandb"))

    resumed = MetricWriter(str(tmp_path), resume_step=2, wandb_project="nl-jax-test")
    assert resumed.wandb.run.id == run_id
    resumed.close()
    fresh = MetricWriter(str(tmp_path), resume_step=0, wandb_project="nl-jax-test")
    assert fresh.wandb.run.id != run_id
    fresh.close()


def test_wandb_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails as if not installed
    with pytest.raises(
        ValueError, match=r"train.wandb_project='p' needs the wandb package.*pip install wandb"
    ):
        MetricWriter(str(tmp_path), wandb_project="p")
    MetricWriter(str(tmp_path)).close()  # without a project nothing imports it
    with pytest.raises(ValueError, match="needs the wandb package"):  # before anything is compiled
        check_config(tiny_config(train__wandb_project="p"))
