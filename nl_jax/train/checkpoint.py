"""Orbax checkpointing: async saves with a keep policy, the data iterator inside, ordered restore.

Layout: `<workdir>/checkpoints/<step>/{state, data, meta}`
  state  the train state (params, optimizer state, step), sharded arrays (orbax StandardSave)
  data   the grain iterator state, one JSON file per process (grain's orbax handler)
  meta   JSON: step, model config, run name (checked on restore)

A parameters-only checkpoint (`save_params_only`: an imported model, `experiments.convert`) is
step 0 with `state = {step, params}`, no data item and `"params_only": true` in meta: a run
restoring it starts from those parameters with a fresh optimizer state and data iterator.

Restore order (MaxText's, written down): the newest checkpoint in this workdir; if it cannot be
read (a corrupted or partial write) or its parameters or optimizer state are not finite (written by
a version that only checked the loss), it is moved aside to `<workdir>/checkpoints_corrupt/` with a
warning and the previous one is tried; with none left the run starts fresh. Nothing is deleted
except by the keep policy. A checkpoint of a different model is an error, never a silent restart.
A state that is not finite is never saved, so the keep policy never pushes out a good checkpoint
for a bad one. Saves are committed atomically by orbax (a temporary directory renamed at the end),
so a run killed mid-save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import json
import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nl_jax.models.registry import upgrade_model_config
from nl_jax.train.step import NonFiniteLossError, all_finite

ITEMS = ("state", "data", "meta")


class _FrozenIteratorState:
    """The iterator state captured when `save` is called (grain's handler calls `get_state()` when
    it writes, which with async saves could be after the loop has moved on)."""

    def __init__(self, state):
        self._state = json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


_all_finite = jax.jit(all_finite)


def _comparable(cfg_dict) -> str:
    return json.dumps(cfg_dict, sort_keys=True, default=str)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for the train loop."""

    def __init__(self, workdir: str, ckpt_cfg, model_cfg_dict: dict):
        self.directory = epath.Path(workdir) / "checkpoints"
        self.corrupt_dir = epath.Path(workdir) / "checkpoints_corrupt"
        self.model_cfg = model_cfg_dict
        self.enabled = bool(ckpt_cfg.get("enabled", True))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=ckpt_cfg.max_to_keep if ckpt_cfg.max_to_keep > 0 else None,
            keep_period=ckpt_cfg.keep_period if ckpt_cfg.get("keep_period", 0) > 0 else None,
            enable_async_checkpointing=bool(ckpt_cfg.async_save),
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._verified: set[int] = set()  # steps this process saw to be finite (restored or saved)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def last_good_step(self) -> int | None:
        """The newest checkpoint on disk known to be finite: restored and checked, or checked and
        saved by this run (call `wait` first so that saves in flight are on disk)."""
        return max((s for s in self.all_steps() if s in self._verified), default=None)

    def save(self, step: int, state, data_iterator, extra_meta: dict | None = None) -> bool:
        """Starts an (async) save of `state` at `step`; returns False if one exists already."""
        if not self.enabled or step in self.manager.all_steps():
            return False
        if not bool(_all_finite(state)):
            raise NonFiniteLossError(
                f"refusing to save checkpoint {step}: its parameters or optimizer state are not finite"
            )
        self._verified.add(int(step))
        meta = {"step": int(step), "model": self.model_cfg, **(extra_meta or {})}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_iterator.get_state())),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _move_aside(self, step: int, why: str) -> None:
        logging.warning(
            "checkpoint %d in %s %s; moving it to %s and trying the previous one",
            step,
            self.directory,
            why,
            self.corrupt_dir,
        )
        if jax.process_index() == 0:
            self.corrupt_dir.mkdir(parents=True, exist_ok=True)
            target = self.corrupt_dir / str(step)
            n = 0
            while target.exists():
                n += 1
                target = self.corrupt_dir / f"{step}.{n}"
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"nl_jax_ckpt_move_aside_{step}")
        self.manager.reload()

    def _check_model(self, step: int, meta: dict) -> None:
        saved = meta.get("model")
        saved = None if saved is None else upgrade_model_config(saved)
        if saved is not None and _comparable(saved) != _comparable(self.model_cfg):
            diff = sorted(
                k
                for k in set(saved) | set(self.model_cfg)
                if _comparable(saved.get(k)) != _comparable(self.model_cfg.get(k))
            )
            raise ValueError(
                f"{self.directory}/{step} holds a checkpoint of a different model (fields differ: "
                f"{', '.join(diff)}); use another --workdir or the same model config"
            )

    def restore_latest(self, abstract_state, data_iterator):
        """(state, step, meta) from the newest readable, finite checkpoint, or None if there is none.
        From a parameters-only checkpoint, state is `{"params"}` alone."""
        for step in reversed(self.all_steps()):
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                    "meta"
                ]
            except Exception as e:  # unreadable metadata: treat like any other corruption
                self._move_aside(step, _cannot_restore(e))
                continue
            self._check_model(step, meta)
            try:
                if meta.get("params_only"):  # the data iterator stays at its start
                    # Another manager: orbax binds an item to the handler of its first use, and this
                    # one saves `state` with StandardSave.
                    with ocp.CheckpointManager(self.directory, item_names=ITEMS) as manager:
                        state = {"params": _restore_params(manager, step, abstract_state["params"])}
                else:
                    state = self.manager.restore(
                        step,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(abstract_state),
                            data=grain.checkpoint.CheckpointRestore(data_iterator),
                        ),
                    )["state"]
            except Exception as e:
                self._move_aside(step, _cannot_restore(e))
                continue
            if not bool(_all_finite(state)):
                del state  # frees the bad state before the previous checkpoint is read
                self._move_aside(step, "holds parameters or optimizer state that are not finite (NaN / inf)")
                continue
            self._verified.add(int(step))
            return state, step, meta
        return None


def _cannot_restore(error: Exception) -> str:
    first = str(error).splitlines()[0][:300] if str(error) else ""
    return f"cannot be restored ({type(error).__name__}: {first})"


def checkpoint_files(workdir: str) -> list[str]:
    """Step directories present under `<workdir>/checkpoints` (for summaries and tests)."""
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted((n for n in os.listdir(d) if n.isdigit()), key=int)


def checkpoints_dir(workdir: str):
    """`<workdir>/checkpoints` as orbax needs it: absolute (a relative local workdir is resolved
    against the current directory; gs:// and other URLs are kept as they are)."""
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir)) / "checkpoints"


def _restore_params(manager, step: int, abstract_params):
    """The `state.params` of checkpoint `step` alone (orbax partial restore), laid out as the
    shardings of `abstract_params` (ShapeDtypeStructs) say."""
    target = {"params": abstract_params}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        ),
    )
    return restored["state"]["params"]


def restore_params(workdir: str, model_cfg, mesh, step: int | None = None):
    """(params, step): only the parameters of the newest (or `step`) checkpoint in `workdir`,
    sharded for `mesh` by the logical-axis rules (for evaluation; the optimizer state stays on
    disk). `params` is the pure dict that `ModelFn.apply` takes."""
    from nl_jax.train.state import ModelFn

    model = ModelFn.from_config(model_cfg)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        model.abstract_params(),
        model.param_shardings(mesh),
    )
    manager = ocp.CheckpointManager(checkpoints_dir(workdir), item_names=ITEMS)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"no checkpoint in {workdir}/checkpoints")
    params = _restore_params(manager, step, target)
    manager.close()
    return params, step


def save_params_only(workdir: str, params, model_cfg_dict: dict, extra_meta: dict | None = None) -> None:
    """Writes `params` (a pure dict, e.g. an imported model's) as the parameters-only checkpoint of
    step 0 in `workdir` (see the module docstring); the workdir must hold no checkpoint yet."""
    directory = epath.Path(workdir) / "checkpoints"
    if directory.exists() and any(p.name.isdigit() for p in directory.iterdir()):
        raise ValueError(f"{directory} already holds checkpoints: write the parameters to a new workdir")
    if not bool(_all_finite(params)):
        raise NonFiniteLossError("refusing to save parameters that are not finite (NaN / inf)")
    meta = {"step": 0, "model": model_cfg_dict, "params_only": True, **(extra_meta or {})}
    state = {"step": np.zeros((), np.int32), "params": params}
    with ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=True), item_names=ITEMS
    ) as m:
        m.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        m.wait_until_finished()
