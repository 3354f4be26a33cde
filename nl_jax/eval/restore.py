"""A trained model from a training workdir: its config and the newest checkpoint's parameters.

The trainer (`nl_jax.train`) writes `<workdir>/config.json` and orbax checkpoints
`<workdir>/checkpoints/<step>/{state, data, meta}` with state = {"step", "params", "opt_state"}.
Evaluation reads only `state.params` (an orbax partial restore: the optimizer state is never read)
and lays them out on the current devices by the logical-axis rules, so a checkpoint written on any
mesh restores onto any other (e.g. trained on a pod slice, evaluated on one host).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from flax import nnx

from nl_jax.models.registry import upgrade_model_config
from nl_jax.parallel.mesh import make_mesh
from nl_jax.train.state import ModelFn


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config as the trainer saved it (`<workdir>/config.json`)."""
    from etils import epath

    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: --workdir must be a directory written by experiments.pretrain "
            "(or pass --config=NAME to name the model)"
        )
    return ml_collections.ConfigDict(upgrade_saved_config(json.loads(path.read_text())))


def upgrade_saved_config(config: dict) -> dict:
    """A run's saved config with renamed model settings under their current names."""
    if isinstance(config.get("model"), dict):
        config = {**config, "model": upgrade_model_config(config["model"])}
    return config


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the checkpoints in `workdir` that hold a train state, ascending."""
    from etils import epath

    d = epath.Path(workdir) / "checkpoints"
    if not d.exists():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "state").exists())


def latest_step(workdir: str) -> int | None:
    steps = checkpoint_steps(workdir)
    return steps[-1] if steps else None


def restore_model(workdir: str, config, mesh=None, step: int | None = None) -> tuple[nnx.Module, int]:
    """(model with the checkpoint's parameters, step) from the newest (or the given) checkpoint in
    `workdir`; parameters are sharded over `mesh` (default: the config's mesh on all devices)."""
    import orbax.checkpoint as ocp

    from nl_jax.train.checkpoint import checkpoints_dir

    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint under {os.path.join(workdir, 'checkpoints')}: train the run first "
            "(experiments.pretrain), or pass --random_init for untrained weights"
        )
    if step is not None and step not in steps:
        raise FileNotFoundError(
            f"no checkpoint of step {step} in {os.path.join(workdir, 'checkpoints')}; "
            f"its steps: {', '.join(map(str, steps))}"
        )
    step = steps[-1] if step is None else step
    mesh = make_mesh(config.mesh) if mesh is None else mesh
    model = ModelFn.from_config(config.model)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        model.abstract_params(),
        model.param_shardings(mesh),
    )
    item = {"params": target}
    manager = ocp.CheckpointManager(
        checkpoints_dir(workdir),
        item_names=("state", "data", "meta"),
        options=ocp.CheckpointManagerOptions(create=False, read_only=True),
    )
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=item,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                    partial_restore=True,
                )
            ),
        )
    except Exception as e:
        raise ValueError(
            f"cannot restore the parameters of checkpoint {step} in {workdir} for model "
            f"{config.model.name!r}: {type(e).__name__}: {str(e)[:500]}"
        ) from e
    finally:
        manager.close()
    state = jax.tree.map(lambda x: x, model.template, is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.replace_by_pure_dict(state, restored["state"]["params"])
    return model.module(state), step
