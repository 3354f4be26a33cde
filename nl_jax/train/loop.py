"""The training loop: `run(config, workdir)` trains, evaluates, logs and checkpoints; returns a summary.

Order of work (each failure is a clear error before anything expensive):
  config checks -> mesh (must match the devices) -> data (tokenizer / corpus checks) -> optimizer ->
  shapes of one train step (`jax.eval_shape`: a model rejecting the shapes, e.g. a chunk size that
  does not divide seq_len, fails here) -> restore the newest readable checkpoint or init sharded ->
  banner -> steps, with hooks every N steps (log, eval, checkpoint, user hooks), the profiler window,
  a save on SIGTERM -> final eval, save, loss-curve PNG, summary.json.

Outputs under `workdir`: checkpoints/, metrics.jsonl, tensorboard/{train,eval}/, loss_curve.png,
summary.json, config.json, profile/, and with `train.wandb_project` wandb/ and wandb_run_id. With a gs:// workdir, checkpoints go straight to GCS and
the small files are written locally and copied up at each save and at the end.
"""

from __future__ import annotations

import dataclasses
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
import numpy as np
from etils import epath

from nl_jax import metrics as metrics_lib
from nl_jax.data.config import from_config as data_from_config
from nl_jax.parallel.mesh import make_mesh
from nl_jax.parallel.rules import assert_params_sufficiently_sharded, sharding_table
from nl_jax.train import banner as banner_lib
from nl_jax.train.checkpoint import Checkpointer, checkpoint_files
from nl_jax.train.program import EVAL_BATCH_KEYS, TRAIN_BATCH_KEYS, build_train_program
from nl_jax.train.state import init_train_state, train_state_from_params
from nl_jax.train.step import NonFiniteLossError


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


def run(config, workdir: str, *, config_name: str = "", hooks: Sequence[Hook] = (), devices=None) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the summary dict.

    `devices`: the devices of the mesh (default: all of them)."""
    wall0 = time.time()
    check_config(config)
    if "://" not in workdir:
        workdir = os.path.abspath(workdir)  # orbax needs absolute paths
    tcfg, ecfg = config.train, config.eval
    primary = jax.process_index() == 0
    local = _local_dir(workdir)

    mesh = make_mesh(config.mesh, devices)  # ValueError if the parallelism sizes do not match the devices
    data = data_from_config(config.data, vocab_size=config.model.vocab_size)
    total = int(tcfg.steps)
    gbs, seq_len = int(config.data.global_batch_size), int(config.data.seq_len)

    # Model, optimizer, shardings, shapes of one step (ValueError on a batch the model rejects).
    program = build_train_program(config, mesh)
    model, tx, shardings = program.model, program.tx, program.shardings
    abstract, batch_sharding = program.abstract_state, program.batch_sharding
    jit_train, jit_eval = program.jit_train, program.jit_eval

    with jax.set_mesh(mesh):

        def to_global(batch: dict, keys: Sequence[str]) -> dict:
            return {k: jax.make_array_from_process_local_data(batch_sharding, batch[k]) for k in keys}

        def evaluate(params) -> dict:
            sums = None
            for batch in data.eval_iterator(ecfg.max_batches if ecfg.max_batches > 0 else None):
                out = jit_eval(params, to_global(batch, EVAL_BATCH_KEYS))
                sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
            if sums is None:
                raise ValueError("the validation split is empty: nothing to evaluate")
            sums = jax.device_get(sums)
            loss = float(sums["nll_sum"] / max(sums["weight_sum"], 1.0))
            return {
                "loss": loss,
                "perplexity": math.exp(min(loss, 50.0)),
                "tokens": float(sums["weight_sum"]),
            }

        ckpt = Checkpointer(workdir, config.checkpoint, config.model.to_dict())
        train_iter = data.train_iterator()
        restored = ckpt.restore_latest(abstract, train_iter)
        if restored is not None:
            state, start, meta = restored
            if "opt_state" not in state:  # parameters alone (an imported model): start training them
                state = train_state_from_params(state["params"], tx, shardings)
        else:
            state, start, meta = init_train_state(model, tx, shardings, tcfg.seed), 0, {}

        # Banner and one-time facts.
        param_count = model.param_count()
        train_flops, flops_source = metrics_lib.train_flops_per_token(
            model.cls, config.model, seq_len, param_count
        )
        device = jax.devices()[0]
        peak = metrics_lib.peak_flops_per_device(device.device_kind, tcfg.get("peak_flops_per_device", 0.0))
        # Fake CPU devices share one process's cores: the CPU peak is per process.
        peak_units = jax.process_count() if device.platform == "cpu" else jax.device_count()
        tokens_per_step = gbs * seq_len
        table = sharding_table(model.template, mesh)
        try:
            excess = assert_params_sufficiently_sharded(
                model.template, mesh, config.mesh.get("sharding_tolerance", 0.02)
            )
            del excess
        except AssertionError as e:
            logging.warning("sharding check: %s", e)
        if primary:
            print(
                banner_lib.banner(
                    config_name=config_name or config.model.name,
                    workdir=workdir,
                    mesh=mesh,
                    param_count=param_count,
                    flops_per_token=train_flops,
                    flops_source=flops_source,
                    peak=peak,
                    tokens_per_step=tokens_per_step,
                    total_steps=total,
                    table=table,
                ),
                flush=True,
            )
            with open(os.path.join(local, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
            if start:
                print(f"resumed from checkpoint step {start}/{total} in {ckpt.directory}", flush=True)

        # Rows past the restored step are redone by this run: they leave metrics.jsonl, so it holds
        # one row per logged step, as an uninterrupted run's does.
        writer = metrics_lib.MetricWriter(
            local,
            enabled=primary,
            resume_step=start,
            wandb_project=tcfg.get("wandb_project", ""),
            run_config=config.to_dict(),
            run_name=config_name or os.path.basename(workdir.rstrip("/")),
        )
        preemption = _Preemption(ckpt)
        profiler = metrics_lib.ProfilerWindow(
            os.path.join(local, "profile"), tcfg.profile_start_step, tcfg.profile_steps, enabled=primary
        )
        throughput = metrics_lib.Throughput(total, tokens_per_step)
        block_each_step = jax.process_count() > 1 and device.platform == "cpu"  # avoids a gloo hang
        summary = {"config": config_name, "workdir": workdir, "params": param_count, "start_step": start}
        eval_history: list[tuple[int, float]] = []
        # Train metrics since the last logged row; saved in checkpoints, so that a run resumed between
        # two log steps averages the same steps into its next row as an uninterrupted run.
        window: list[dict] = list(meta.get("log_window", []))
        pending = None
        last_row: dict = {}
        last_loss = None
        preempted = False

        def log_eval(step: int, write: bool = True) -> dict:
            res = evaluate(state["params"])
            eval_history.append((step, res["loss"]))
            if write:
                writer.write(step, "eval", res)
            if primary:
                print(f"eval  step {step}: loss {res['loss']:.4f}  ppl {res['perplexity']:.2f}", flush=True)
            return res

        def consume(p) -> None:
            nonlocal last_loss
            step_done, m = p
            m = jax.device_get(m)
            if not bool(m["finite"]):
                ckpt.wait()
                good = ckpt.last_good_step()
                loss, gnorm = float(m["loss"]), float(m["grad_norm"])
                what = (
                    f"non-finite loss or gradient (loss {loss}, grad norm {gnorm})"
                    if not (math.isfinite(loss) and math.isfinite(gnorm))
                    else f"non-finite parameters or optimizer state after the update (loss {loss}, "
                    f"grad norm {gnorm}, lr {float(m['lr'])})"
                )
                raise NonFiniteLossError(
                    f"{what} at step {step_done}; stopped without saving that state. Last good checkpoint: "
                    f"{'step ' + str(good) if good is not None else 'none'} in {ckpt.directory}. "
                    "Try a lower optim.lr, a longer optim.warmup_steps or optim.clip_norm."
                )
            last_loss = float(m["loss"])
            window.append({k: float(v) for k, v in m.items() if k != "finite"})

        def save(step: int) -> None:
            extra = {"config_name": config_name, "log_window": [dict(w) for w in window]}
            if ckpt.save(step, state, train_iter, extra) and primary:
                print(f"checkpoint step {step} -> {ckpt.directory}", flush=True)
            _sync_up(local, workdir)

        try:
            if start == 0 and ecfg.every > 0:
                log_eval(0)
            step = start
            while step < total:
                batch = to_global(next(train_iter), TRAIN_BATCH_KEYS)
                with profiler.step(step):
                    state, m = jit_train(state, batch)
                if block_each_step:
                    jax.block_until_ready(state)
                step += 1
                if pending is not None:
                    consume(pending)
                pending = (step, m)
                if not throughput.started:  # the first step includes compilation: start the clock after it
                    consume(pending)
                    pending = None
                    throughput.start(step)
                is_last = step == total
                if step % tcfg.log_every == 0 or is_last:
                    if pending is not None:
                        consume(pending)
                        pending = None
                    if window:
                        row = {k: float(np.mean([w[k] for w in window])) for k in ("loss", "grad_norm")}
                        row["lr"] = window[-1]["lr"]
                        row.update(throughput.report(step))
                        row["tokens"] = float(step * tokens_per_step)
                        if "tokens_per_s" in row:
                            row["mfu"] = metrics_lib.mfu(row["tokens_per_s"], train_flops, peak_units, peak)
                        window.clear()
                        writer.write(step, "train", {k: v for k, v in row.items() if v is not None})
                        last_row = row
                        if primary:
                            print(metrics_lib.progress_line(step, total, row), flush=True)
                if (ecfg.every > 0 and step % ecfg.every == 0) or is_last:
                    if pending is not None:
                        consume(pending)
                        pending = None
                    log_eval(step)
                for hook in hooks:
                    if step % hook.every == 0:
                        hook.fn(step, state, last_row)
                preempted = preemption.reached(step)
                ckpt_every = config.checkpoint.every
                if (ckpt_every > 0 and step % ckpt_every == 0) or is_last or preempted:
                    if pending is not None:
                        consume(pending)
                        pending = None
                    save(step)
                if preempted:
                    if primary:
                        print(f"preempted: saved step {step}; run the same command to resume", flush=True)
                    break
            if pending is not None:
                consume(pending)
            if start >= total and not eval_history:
                log_eval(total, write=False)  # a finished run: report its final validation loss again
        finally:
            profiler.finish()
            preemption.close()
            ckpt.close()
            writer.close()

        rows = metrics_lib.read_jsonl(writer.jsonl_path) if primary else []
        png = None
        if primary:
            png = metrics_lib.plot_loss_curve(
                rows, os.path.join(local, "loss_curve.png"), f"{config_name or config.model.name}"
            )
        evals = [(r["step"], r["loss"]) for r in rows if r.get("split") == "eval"] or eval_history
        trains = [r for r in rows if r.get("split") == "train"]
        summary.update(
            final_step=int(step) if total > start else total,
            total_steps=total,
            preempted=preempted,
            final_train_loss=last_loss,
            initial_eval_loss=evals[0][1] if evals else None,
            final_eval_loss=eval_history[-1][1] if eval_history else None,
            best_eval_loss=min(v for _, v in evals) if evals else None,
            tokens_per_s=trains[-1].get("tokens_per_s") if trains else None,
            mfu=trains[-1].get("mfu") if trains else None,
            train_flops_per_token=train_flops,
            checkpoints=[int(s) for s in checkpoint_files(workdir)]
            if "://" not in workdir
            else ckpt.all_steps(),
            loss_curve=png,
            wall_time_s=round(time.time() - wall0, 2),
        )
        if primary:
            with open(os.path.join(local, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            print(metrics_lib.format_summary(summary), flush=True)
            _sync_up(local, workdir)
        return summary
