"""The training loop: `run(config, workdir)` trains, evaluates, logs and checkpoints; returns a summary.

Order of work (each failure is a clear error before anything expensive):
  config checks -> mesh (must match the devices) -> data (tokenizer / corpus checks) -> optimizer ->
  shapes of one train step (`jax.eval_shape`: a model rejecting the shapes, e.g. a chunk size that
  does not divide seq_len, fails here) -> restore the newest readable checkpoint or init sharded ->
  banner -> compile the train step (then return the compiler's freed heap to the OS) -> steps, with
  hooks every N steps (log, eval, checkpoint, user hooks), the profiler window, a save on SIGTERM ->
  final eval, save, loss-curve PNG, summary.json.

Outputs under `workdir`: checkpoints/, metrics.jsonl, tensorboard/{train,eval}/, loss_curve.png,
summary.json, config.json, profile/, and with `train.wandb_project` wandb/ and wandb_run_id. With a gs:// workdir, checkpoints go straight to GCS and
the small files are written locally and copied up at each save and at the end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from etils import epath

from nl_jax import metrics as metrics_lib
from nl_jax.data.config import from_config as data_from_config
from nl_jax.models.registry import check_document_alignment, check_document_boundaries
from nl_jax.parallel.mesh import make_mesh
from nl_jax.parallel.rules import assert_params_sufficiently_sharded, sharding_table
from nl_jax.train import banner as banner_lib
from nl_jax.train.checkpoint import Checkpointer, checkpoint_files
from nl_jax.train.metrics_buffer import MetricsBuffer
from nl_jax.train.program import build_train_program
from nl_jax.train.state import init_train_state, train_state_from_params


@dataclasses.dataclass
class Hook:
    """`fn(step, state, row)` every `every` steps (row: the last logged train metrics, or {})."""

    every: int
    fn: Callable[[int, dict, dict], None]


def _local_dir(workdir: str) -> str:
    """Where the small outputs are written: the workdir itself, or for a remote (gs://) workdir a
    local directory seeded with the remote metric rows and W&B run id, so a resumed run extends its
    history (and the copy up at each save overwrites nothing it did not read)."""
    if "://" not in workdir:
        os.makedirs(workdir, exist_ok=True)
        return workdir
    local = tempfile.mkdtemp(prefix="nl_jax_run_")
    for name in ("metrics.jsonl", "metrics_superseded.jsonl", "wandb_run_id"):
        remote = epath.Path(workdir) / name
        if jax.process_index() == 0 and remote.exists():
            with open(os.path.join(local, name), "wb") as f:
                f.write(remote.read_bytes())
    return local


def _sync_up(local: str, workdir: str) -> None:
    """Copies the small output files of a remote workdir up (process 0 only)."""
    if local == workdir or jax.process_index() != 0:
        return
    for root, _, files in os.walk(local):
        for name in files:
            src = os.path.join(root, name)
            dst = epath.Path(workdir) / os.path.relpath(src, local)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(open(src, "rb").read())


def check_config(config) -> None:
    """Cheap consistency checks with messages naming the fields (ValueError), and warnings for
    settings that train but cannot do what they are meant to."""
    t, d = config.train, config.data
    if t.steps < 1:
        raise ValueError(f"train.steps must be >= 1, got {t.steps}")
    a = t.grad_accum_steps
    if a < 1 or d.global_batch_size % a:
        raise ValueError(
            f"train.grad_accum_steps={a} must be >= 1 and divide data.global_batch_size={d.global_batch_size}"
        )
    if config.model.get("vocab_size") and d.get("vocab_size") and d.vocab_size != config.model.vocab_size:
        raise ValueError(
            f"data.vocab_size={d.vocab_size} differs from model.vocab_size={config.model.vocab_size}"
        )
    check_document_boundaries(config.model.name, d.get("document_boundaries", "ignore"))
    check_document_alignment(
        config.model, d.get("document_boundaries", "ignore"), d.get("document_alignment", 0)
    )
    if t.get("wandb_project"):
        metrics_lib.import_wandb(t.wandb_project)  # a missing package fails before any compilation
    cms = config.model.get("cms")
    if cms is not None and cms.get("signal", "none") != "none":
        # A CMS level applies its update at the end of each period: one that does not end before the
        # sequence does never changes its fast weights in training, i.e. it is a static MLP.
        for level, period in enumerate(cms.get("periods", ())):
            if period >= d.seq_len:
                logging.warning(
                    "model.cms.periods[%d]=%d >= data.seq_len=%d: CMS level %d never updates within a "
                    "training sequence, so it trains as a static MLP; use periods below data.seq_len or "
                    "a longer data.seq_len",
                    level,
                    period,
                    d.seq_len,
                    level + 1,
                )


class _Preemption:
    """SIGTERM -> save at the end of the current step and stop. Single-process runs install a
    handler; multi-process runs use jax's preemption sync point (all hosts agree on the step)."""

    def __init__(self, checkpointer):
        self.flag, self._ckpt, self._previous = False, checkpointer, None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.flag = True
        logging.warning("SIGTERM received: saving a checkpoint at the end of this step, then stopping")

    def reached(self, step: int) -> bool:
        if self.flag:
            return True
        if jax.process_count() > 1 and self._ckpt is not None:
            try:
                return bool(self._ckpt.manager.reached_preemption(step))
            except Exception:  # no preemption sync manager on this platform
                return False
        return False

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def return_free_heap() -> None:
    """Hands the heap pages malloc holds free back to the OS (glibc's `malloc_trim`; a no-op where the C
    library has none). XLA's compiler frees most of its working memory when a compile ends, but glibc
    keeps it mapped: about 0.7 GiB after compiling hope_tiny's train step, under the step's own buffers
    when it runs (README, "HOPE training speed")."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """The C library's malloc_trim, looked up once (None where it has none)."""
    return getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)


def run(config, workdir: str, *, config_name: str = "", hooks: Sequence[Hook] = (), devices=None) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the summary dict.

    `devices`: the devices of the mesh (default: all of them)."""
    wall0 = time.time()
    check_config(config)
    if "://" not in workdir:
        workdir = os.path.abspath(workdir)  # orbax needs absolute paths
    local = _local_dir(workdir)
    mesh = make_mesh(config.mesh, devices)  # ValueError if the parallelism sizes do not match the devices
    data = data_from_config(config.data, vocab_size=config.model.vocab_size)
    # Model, optimizer, shardings, shapes of one step (ValueError on a batch the model rejects).
    program = build_train_program(config, mesh)
    with jax.set_mesh(mesh):
        training = _Run(config, workdir, local, config_name, mesh, data, program)
        try:
            training.loop(hooks)
        finally:
            training.close()
        return training.summary(wall0)


class _Run:
    """One call of `run` inside its mesh: set up (restore or init, banner, writers), `loop` over the
    steps, `close` the writers, `summary`. The attributes are the state the steps share."""

    def __init__(self, config, workdir: str, local: str, config_name: str, mesh, data, program):
        self.config, self.workdir, self.local, self.config_name = config, workdir, local, config_name
        self.tcfg, self.ecfg = config.train, config.eval
        self.primary = jax.process_index() == 0
        self.data, self.program = data, program
        self.total = int(config.train.steps)
        self.tokens_per_step = int(config.data.global_batch_size) * int(config.data.seq_len)

        self.ckpt = Checkpointer(workdir, config.checkpoint, config.model.to_dict())
        self.train_iter = data.train_iterator()
        restored = self.ckpt.restore_latest(program.abstract_state, self.train_iter)
        if restored is not None:
            self.state, self.start, meta = restored
            if "opt_state" not in self.state:  # parameters alone (an imported model): start training them
                self.state = train_state_from_params(self.state["params"], program.tx, program.shardings)
        else:
            self.state = init_train_state(program.model, program.tx, program.shardings, self.tcfg.seed)
            self.start, meta = 0, {}
        self.step = self.start

        model = program.model
        self.param_count = model.param_count()
        self.train_flops, flops_source = metrics_lib.train_flops_per_token(
            model.cls, config.model, int(config.data.seq_len), self.param_count
        )
        device = jax.devices()[0]
        self.peak = metrics_lib.peak_flops_per_device(
            device.device_kind, self.tcfg.get("peak_flops_per_device", 0.0)
        )
        # Fake CPU devices share one process's cores: the CPU peak is per process.
        self.peak_units = jax.process_count() if device.platform == "cpu" else jax.device_count()
        self._banner(mesh, flops_source)

        # Rows past the restored step are redone by this run: they leave metrics.jsonl, so it holds
        # one row per logged step, as an uninterrupted run's does.
        self.writer = metrics_lib.MetricWriter(
            local,
            enabled=self.primary,
            resume_step=self.start,
            wandb_project=self.tcfg.get("wandb_project", ""),
            run_config=config.to_dict(),
            run_name=config_name or os.path.basename(workdir.rstrip("/")),
        )
        self.preemption = _Preemption(self.ckpt)
        self.profiler = metrics_lib.ProfilerWindow(
            os.path.join(local, "profile"),
            self.tcfg.profile_start_step,
            self.tcfg.profile_steps,
            enabled=self.primary,
        )
        self.throughput = metrics_lib.Throughput(self.total, self.tokens_per_step)
        self.block_each_step = jax.process_count() > 1 and device.platform == "cpu"  # avoids a gloo hang
        self.metrics = MetricsBuffer(self.ckpt, meta.get("log_window", []))
        self.eval_history: list[tuple[int, float]] = []
        self.train_fn = None  # the train step, compiled by `loop` before its first eval and step
        self.last_row: dict = {}
        self.preempted = False

    def _banner(self, mesh, flops_source: str) -> None:
        """The banner and config.json (process 0); a warning for weights sharded too little."""
        model, config = self.program.model, self.config
        table = sharding_table(model.template, mesh)
        try:
            assert_params_sufficiently_sharded(
                model.template, mesh, config.mesh.get("sharding_tolerance", 0.02)
            )
        except AssertionError as e:
            logging.warning("sharding check: %s", e)
        if not self.primary:
            return
        print(
            banner_lib.banner(
                config_name=self.config_name or config.model.name,
                workdir=self.workdir,
                mesh=mesh,
                param_count=self.param_count,
                flops_per_token=self.train_flops,
                flops_source=flops_source,
                peak=self.peak,
                tokens_per_step=self.tokens_per_step,
                total_steps=self.total,
                table=table,
            ),
            flush=True,
        )
        with open(os.path.join(self.local, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        if self.start:
            print(
                f"resumed from checkpoint step {self.start}/{self.total} in {self.ckpt.directory}", flush=True
            )

    def _to_global(self, batch: dict, keys: Sequence[str]) -> dict:
        sharding = self.program.batch_sharding
        return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in keys}

    def _evaluate(self) -> dict:
        max_batches = self.ecfg.max_batches if self.ecfg.max_batches > 0 else None
        sums = None
        for batch in self.data.eval_iterator(max_batches):
            out = self.program.jit_eval(self.state["params"], self._to_global(batch, self.program.eval_keys))
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        if sums is None:
            raise ValueError("the validation split is empty: nothing to evaluate")
        sums = jax.device_get(sums)
        return_free_heap()  # what the eval step's compile (first eval) and its batches freed
        loss = float(sums["nll_sum"] / max(sums["weight_sum"], 1.0))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(sums["weight_sum"])}

    def _log_eval(self, step: int, write: bool = True) -> None:
        res = self._evaluate()
        self.eval_history.append((step, res["loss"]))
        if write:
            self.writer.write(step, "eval", res)
        if self.primary:
            print(f"eval  step {step}: loss {res['loss']:.4f}  ppl {res['perplexity']:.2f}", flush=True)

    def _log_train(self, step: int) -> None:
        row = self.metrics.take_row()
        if row is None:
            return
        row.update(self.throughput.report(step))
        row["tokens"] = float(step * self.tokens_per_step)
        if "tokens_per_s" in row:
            row["mfu"] = metrics_lib.mfu(row["tokens_per_s"], self.train_flops, self.peak_units, self.peak)
        self.writer.write(step, "train", {k: v for k, v in row.items() if v is not None})
        self.last_row = row
        if self.primary:
            print(metrics_lib.progress_line(step, self.total, row), flush=True)

    def _save(self, step: int) -> None:
        extra = {"config_name": self.config_name, "log_window": self.metrics.saved_window()}
        if self.ckpt.save(step, self.state, self.train_iter, extra) and self.primary:
            print(f"checkpoint step {step} -> {self.ckpt.directory}", flush=True)
        _sync_up(self.local, self.workdir)

    def _train_step(self) -> None:
        batch = self._to_global(next(self.train_iter), self.program.train_keys)
        with self.profiler.step(self.step):
            self.state, m = self.train_fn(self.state, batch)
        if self.block_each_step:
            jax.block_until_ready(self.state)
        self.step += 1
        self.metrics.push(self.step, m)
        if not self.throughput.started:  # the first step includes compilation: start the clock after it
            self.metrics.flush()
            self.throughput.start(self.step)

    def loop(self, hooks: Sequence[Hook]) -> None:
        """The steps from the restored one to `train.steps`, or to a preemption."""
        tcfg, ecfg, ckpt_every = self.tcfg, self.ecfg, self.config.checkpoint.every
        if self.step < self.total:
            # Compiled apart from the first step, and before the eval step: the compiler's freed memory
            # goes back to the OS before any step's buffers are allocated on top of it.
            self.train_fn = self.program.jit_train.lower(self.state, self.program.abstract_batch).compile()
            return_free_heap()
        if self.start == 0 and ecfg.every > 0:
            self._log_eval(0)
        while self.step < self.total:
            self._train_step()
            step = self.step
            is_last = step == self.total
            if step % tcfg.log_every == 0 or is_last:
                self.metrics.flush()
                self._log_train(step)
            if (ecfg.every > 0 and step % ecfg.every == 0) or is_last:
                self.metrics.flush()
                self._log_eval(step)
            for hook in hooks:
                if step % hook.every == 0:
                    hook.fn(step, self.state, self.last_row)
            self.preempted = self.preemption.reached(step)
            if (ckpt_every > 0 and step % ckpt_every == 0) or is_last or self.preempted:
                self.metrics.flush()
                self._save(step)
            if self.preempted:
                if self.primary:
                    print(f"preempted: saved step {step}; run the same command to resume", flush=True)
                break
        self.metrics.flush()
        if self.start >= self.total and not self.eval_history:
            self._log_eval(self.total, write=False)  # a finished run: report its final validation loss again

    def close(self) -> None:
        self.profiler.finish()
        self.preemption.close()
        self.ckpt.close()
        self.writer.close()

    def summary(self, wall0: float) -> dict:
        """The summary dict; process 0 also writes summary.json and the loss-curve PNG and prints it."""
        name = self.config_name or self.config.model.name
        rows = metrics_lib.read_jsonl(self.writer.jsonl_path) if self.primary else []
        png = None
        if self.primary:
            png = metrics_lib.plot_loss_curve(rows, os.path.join(self.local, "loss_curve.png"), name)
        evals = [(r["step"], r["loss"]) for r in rows if r.get("split") == "eval"] or self.eval_history
        trains = [r for r in rows if r.get("split") == "train"]
        if "://" in self.workdir:
            checkpoints = self.ckpt.all_steps()
        else:
            checkpoints = [int(s) for s in checkpoint_files(self.workdir)]
        summary = {
            "config": self.config_name,
            "workdir": self.workdir,
            "params": self.param_count,
            "start_step": self.start,
            "final_step": int(self.step) if self.total > self.start else self.total,
            "total_steps": self.total,
            "preempted": self.preempted,
            "final_train_loss": self.metrics.last_loss,
            "initial_eval_loss": evals[0][1] if evals else None,
            "final_eval_loss": self.eval_history[-1][1] if self.eval_history else None,
            "best_eval_loss": min(v for _, v in evals) if evals else None,
            "tokens_per_s": trains[-1].get("tokens_per_s") if trains else None,
            "mfu": trains[-1].get("mfu") if trains else None,
            "train_flops_per_token": self.train_flops,
            "checkpoints": checkpoints,
            "loss_curve": png,
            "wall_time_s": round(time.time() - wall0, 2),
        }
        if self.primary:
            with open(os.path.join(self.local, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            print(metrics_lib.format_summary(summary), flush=True)
            _sync_up(self.local, self.workdir)
        return summary
