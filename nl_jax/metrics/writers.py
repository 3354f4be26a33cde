"""Metric writers, used by process 0 only: TensorBoard event files, JSON lines, and optionally a
Weights & Biases run.

TensorBoard files are written by tensorboardX (a small pure-Python package), so
`tensorboard --logdir WORKDIR` reads the runs; `read_events` reads them back with TensorBoard's own
loader (the `tensorboard` package: tests, scripts). JSON lines (`metrics.jsonl`) hold one object
per logged step, the easiest format for scripts: `{"step": 100, "split": "train", "loss": 2.31, ...}`.
W&B (`train.wandb_project`, the `wandb` package) gets the same scalars as `<split>/<name>`.

Every row is flushed as it is written, so a killed run loses no row it logged. A run resumed from
step S redoes the steps after S: `MetricWriter(..., resume_step=S)` moves the rows past S to
`metrics_superseded.jsonl` (nothing is deleted) and starts its TensorBoard files with a
SessionLog START at S + 1, which makes TensorBoard drop the older events from that step on.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import secrets
import time
from collections.abc import Mapping

_FILE_NUMBERS = itertools.count()


class TensorBoardWriter:
    """Scalars to `<logdir>/events.out.tfevents.<time>.<host>.<pid>.<n>` (one file per writer).

    tensorboardX's synchronous `EventsWriter`, not its `SummaryWriter`: the latter hands events to a
    background thread, so its flush() can return before the event is in the file; here every row is
    written and flushed before `write_scalars` returns.

    `purge_step`: start with a SessionLog START at that step; TensorBoard then discards the events
    of earlier files at steps >= purge_step (a resumed run's redone steps)."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        # Imported on first use: tensorboardX imports torch when it is installed, seconds of start-up.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._event = Event
        os.makedirs(logdir, exist_ok=True)
        # The name holds only the second: writers started in the same second need their own suffix,
        # numbered so that TensorBoard, which reads a run's files in name order, reads them in order.
        suffix = f".{os.getpid()}.{next(_FILE_NUMBERS):04d}"
        self._writer = EventsWriter(os.path.join(logdir, "events"), suffix)
        (self.path,) = glob.glob(os.path.join(glob.escape(logdir), f"events.out.tfevents.*{suffix}"))
        if purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            self._write(Event(step=purge_step, wall_time=time.time(), session_log=start))
        self._writer.flush()

    def _write(self, event) -> None:
        self._writer.write_event(event)
        self._writer.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        values = [
            Summary.Value(tag=k, simple_value=float(v))
            for k, v in scalars.items()
            if isinstance(v, (int, float))
        ]
        if values:
            self._write(self._event(step=int(step), wall_time=time.time(), summary=Summary(value=values)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_events(path: str) -> list[dict]:
    """The events of one event file as TensorBoard's loader reads them: [{"step", "wall_time",
    "scalars", "session_start"}]. Needs the `tensorboard` package (it also views the runs)."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        from tensorboard.util import tensor_util
    except ImportError as e:
        raise ImportError(
            "reading TensorBoard event files needs the tensorboard package: pip install tensorboard"
        ) from e
    events = []
    for e in EventFileLoader(path).Load():
        # The loader hands scalars over as 0-d tensors, whichever way they were written.
        scalars = {v.tag: float(tensor_util.make_ndarray(v.tensor)) for v in e.summary.value}
        start = e.HasField("session_log") and e.session_log.status == e.session_log.START
        events.append({"step": e.step, "wall_time": e.wall_time, "scalars": scalars, "session_start": start})
    return events


def import_wandb(project: str):
    """The wandb module, or a ValueError saying how to get it (train.wandb_project asks for it)."""
    try:
        import wandb
    except ImportError:
        raise ValueError(
            f"train.wandb_project={project!r} needs the wandb package, which is not installed: "
            "pip install wandb (or the package's [wandb] extra), or leave train.wandb_project empty"
        ) from None
    return wandb


class WandbWriter:
    """Scalars to a Weights & Biases run, as `<split>/<name>` at W&B step = the train step.

    The run's id is kept in `<logdir>/wandb_run_id`, so a resumed run continues the same W&B run;
    a fresh run (resume_step 0) starts a new one. W&B keeps the rows the interrupted run had logged
    past its checkpoint (it ignores steps below its own), which the resumed run recomputes the same.
    W&B's own files go to `<logdir>/wandb`; `WANDB_MODE=offline` keeps the run there for
    `wandb sync`."""

    def __init__(
        self, project: str, logdir: str, resume_step: int = 0, config: dict | None = None, name: str = ""
    ):
        wandb = import_wandb(project)
        id_path = os.path.join(logdir, "wandb_run_id")
        run_id = ""
        if resume_step > 0 and os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        run_id = run_id or secrets.token_hex(4)
        os.makedirs(logdir, exist_ok=True)
        self.run = wandb.init(
            project=project, id=run_id, resume="allow", dir=logdir, config=config, name=name or None
        )
        with open(id_path, "w") as f:
            f.write(run_id + "\n")

    def write_scalars(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        row = {f"{split}/{k}": float(v) for k, v in scalars.items() if isinstance(v, (int, float))}
        if row:
            self.run.log(row, step=int(step))

    def close(self) -> None:
        self.run.finish()


class JsonlWriter:
    """One JSON object per line: {"step": s, "split": ..., **scalars}."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._f = open(path, "a")

    def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        row = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        row.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in scalars.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file; a last line without its newline that does not parse (a write
    cut short by a kill) is left out."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break
            raise
    return rows


def supersede_rows(path: str, first_step: int) -> int:
    """Moves the rows of `path` at steps >= `first_step`, and a last line cut short by a kill, to
    `<stem>_superseded.jsonl` beside it; returns how many lines moved. The moved lines are appended
    there before `path` is atomically replaced, so a kill in between loses nothing."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        text = f.read()
    keep, moved = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a torn last line: every row is written whole, then flushed
            moved.append(line)
            continue
        (moved if row.get("step", 0) >= first_step else keep).append(line)
    if not moved and (not text or text.endswith("\n")):
        return 0
    if moved:
        stem, ext = os.path.splitext(path)
        with open(f"{stem}_superseded{ext}", "a") as f:
            f.write("".join(line + "\n" for line in moved))
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return len(moved)


class MetricWriter:
    """The writers under one directory (TensorBoard runs `train/` and `eval/`, metrics.jsonl, and a
    W&B run when `wandb_project` is set); a no-op on processes other than 0.

    `resume_step`: the step the run starts from (0: a fresh run). The rows of later steps, which this
    run logs again, are moved out of metrics.jsonl (a fresh run moves them all). `run_config` and
    `run_name` describe the run to W&B."""

    def __init__(
        self,
        logdir: str,
        enabled: bool = True,
        resume_step: int = 0,
        wandb_project: str = "",
        run_config: dict | None = None,
        run_name: str = "",
    ):
        self.logdir, self.enabled = logdir, enabled
        self.jsonl_path = os.path.join(logdir, "metrics.jsonl")
        self._first_step = resume_step + 1 if resume_step > 0 else 0
        self._tb: dict[str, TensorBoardWriter] = {}
        self._jsonl = None
        self.wandb = None
        if enabled:
            # tensorboardX's import (seconds where torch is installed, which it imports) is paid here,
            # before the first step, not by the step whose row is written first, which the trainer times.
            import tensorboardX.event_file_writer  # noqa: F401

            supersede_rows(self.jsonl_path, self._first_step)
            self._jsonl = JsonlWriter(self.jsonl_path)
            if wandb_project:
                self.wandb = WandbWriter(wandb_project, logdir, resume_step, run_config, run_name)

    def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        if split not in self._tb:
            self._tb[split] = TensorBoardWriter(
                os.path.join(self.logdir, "tensorboard", split), purge_step=self._first_step
            )
        self._tb[split].write_scalars(step, scalars)
        self._jsonl.write(step, split, scalars)
        if self.wandb is not None:
            self.wandb.write_scalars(step, split, scalars)

    def flush(self) -> None:
        for w in list(self._tb.values()) + ([self._jsonl] if self._jsonl else []):
            w.flush()

    def close(self) -> None:
        for w in list(self._tb.values()) + ([self._jsonl] if self._jsonl else []):
            w.close()
        if self.wandb is not None:
            self.wandb.close()
