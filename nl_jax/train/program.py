"""The compiled-to-be training program of a config on a mesh: model, optimizer, shardings, jitted steps.

`build_train_program(config, mesh)` is the single place where the train and eval steps are built;
`nl_jax.train.loop.run` executes them and `nl_jax.train.aot` compiles them ahead of time for a TPU
slice, so what is compiled for a pod is exactly what a run executes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nl_jax.optim.factory import make_optimizer
from nl_jax.train.state import ModelFn, abstract_train_state, state_shardings_for
from nl_jax.train.step import make_eval_step, make_train_step


def batch_keys(config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train, eval) keys the steps read of a batch. The pipeline's segment ids go to the device only
    when the model reads them (data.document_boundaries other than "ignore", which
    `nl_jax.train.loop.check_config` has checked the model supports); else they stay on the host.
    Training reads the targets' weights only in the aligned layout (data.document_alignment > 1),
    whose pads weigh 0."""
    mode = config.data.get("document_boundaries", "ignore")
    segments = ("segment_ids",) if mode != "ignore" else ()
    weights = ("weights",) if config.data.get("document_alignment", 0) > 1 else ()
    return ("tokens",) + weights + segments, ("tokens", "weights") + segments


@dataclasses.dataclass
class TrainProgram:
    """What a training run compiles: the train step is `jit_train(state, batch) -> (state, metrics)`
    with the state donated; `jit_eval(params, batch) -> sums`."""

    model: ModelFn
    tx: object  # optax.GradientTransformation
    schedule: Callable
    shardings: dict  # NamedShardings of the train state, same tree as abstract_state
    abstract_state: dict  # ShapeDtypeStructs (with shardings) of the train state
    batch_sharding: NamedSharding
    # train_keys -> ShapeDtypeStruct((global_batch, seq_len + 1), int32); weights: float32
    # [global_batch, seq_len]
    abstract_batch: dict
    train_keys: tuple[str, ...]  # what jit_train reads of a batch
    eval_keys: tuple[str, ...]  # what jit_eval reads of a batch
    jit_train: Callable
    jit_eval: Callable


def build_train_program(config, mesh: Mesh) -> TrainProgram:
    """Builds the model, optimizer, state shardings and jitted steps of `config` on `mesh`.

    Call it outside any mesh context (the model template is built without one; the rest under
    `jax.set_mesh(mesh)`, entered here). Raises ValueError when the microbatch does not split over the
    batch devices, the model does not implement `data.document_boundaries`, or the model rejects the
    batch shape (e.g. a chunk size not dividing seq_len).
    """
    tcfg = config.train
    train_keys, eval_keys = batch_keys(config)
    model = ModelFn.from_config(
        config.model, seed=tcfg.seed, documents=config.data.get("document_boundaries", "ignore")
    )
    total, accum = int(tcfg.steps), int(tcfg.grad_accum_steps)
    gbs, seq_len = int(config.data.global_batch_size), int(config.data.seq_len)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (gbs // accum) % batch_shards:
        raise ValueError(
            f"the microbatch of {gbs // accum} sequences (data.global_batch_size={gbs} / "
            f"train.grad_accum_steps={accum}) does not split over the {batch_shards} data x fsdp devices"
        )
    tx, schedule = make_optimizer(config.optim, total, model.param_names())
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    replicated = NamedSharding(mesh, P())

    # Outside the mesh context: optax builds small concrete arrays here, which must not be placed on
    # the (possibly abstract, ahead-of-time) devices of the mesh.
    shardings = state_shardings_for(model, tx, mesh)
    with jax.set_mesh(mesh):
        abstract = abstract_train_state(model, tx, shardings)
        train_step = make_train_step(model, tx, schedule, accum)
        row = jax.ShapeDtypeStruct((gbs, seq_len + 1), jnp.int32, sharding=batch_sharding)
        targets = jax.ShapeDtypeStruct((gbs, seq_len), jnp.float32, sharding=batch_sharding)
        abstract_batch = {k: targets if k == "weights" else row for k in train_keys}
        try:
            jax.eval_shape(train_step, abstract, abstract_batch)
        except ValueError as e:
            raise ValueError(
                f"model {config.model.name!r} cannot train on batches of {gbs} x {seq_len} tokens: {e}"
            ) from e
        jit_train = jax.jit(
            train_step,
            in_shardings=(shardings, {k: batch_sharding for k in train_keys}),
            out_shardings=(shardings, replicated),
            donate_argnums=0,
        )
        jit_eval = jax.jit(
            make_eval_step(model),
            in_shardings=(shardings["params"], {k: batch_sharding for k in eval_keys}),
            out_shardings=replicated,
        )
    return TrainProgram(
        model=model,
        tx=tx,
        schedule=schedule,
        shardings=shardings,
        abstract_state=abstract,
        batch_sharding=batch_sharding,
        abstract_batch=abstract_batch,
        train_keys=train_keys,
        eval_keys=eval_keys,
        jit_train=jit_train,
        jit_eval=jit_eval,
    )
