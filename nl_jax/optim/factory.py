"""The `optim` config section -> one optax transformation: clip, optimizer, decoupled weight decay.

    tx, schedule = make_optimizer(cfg.optim, total_steps, param_names=names)

`optim.name` is "adamw" (optax) or any chained alias of `nl_jax.optim` (m3, muon, deep_momentum,
delta_momentum, momentum_memory, preconditioned_momentum, adam_memory, delta_gd, feature_momentum,
generalized_gd, adagrad_memory); `optim.kwargs` holds that alias's extra arguments. Weight decay
is applied the same way for every optimizer (decoupled, `W <- W - lr * wd * W`, on matrices only),
so switching optimizers changes nothing else.

`param_names` (optional) is a pytree like the params holding each parameter's logical axis names
(e.g. ('layers', 'embed', 'mlp')). It decides the decay mask (norm scales and vectors are not
decayed) and, for matrix optimizers, which axes form the matrix (see `matrix_dims`).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import optax

from nl_jax.optim import schedules
from nl_jax.optim.matrix import MatrixDims

OPTIMIZERS = (
    "adamw",
    "m3",
    "muon",
    "deep_momentum",
    "delta_momentum",
    "momentum_memory",
    "preconditioned_momentum",
    "adam_memory",
    "delta_gd",
    "feature_momentum",
    "generalized_gd",
    "adagrad_memory",
)
BATCH_AXES = ("layers", "levels")  # stacked copies: each slice is its own matrix


def _core_names(names) -> tuple:
    return tuple(n for n in names if n not in BATCH_AXES)


def decay_mask(params, param_names=None):
    """True for parameters that get weight decay: matrices (>= 2 non-stacked axes), not norms/biases."""
    if param_names is None:
        return jax.tree.map(lambda p: p.ndim >= 2, params)
    return jax.tree.map(
        lambda p, n: len(_core_names(n)) >= 2 if n else p.ndim >= 2,
        params,
        param_names,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def matrix_dims(param_names):
    """MatrixDims per parameter from its logical names: stacked axes are batch axes; the 'embed'
    axis is the input side (reduction) unless it is last (an output projection back into the
    residual stream). Vectors get None (the optimizer's element-wise fallback)."""

    def one(names):
        if not names:
            return None
        core = [i for i, n in enumerate(names) if n not in BATCH_AXES]
        if len(core) < 2:
            return None
        if names[core[-1]] == "embed":
            return MatrixDims(tuple(core[:-1]), core[-1])
        return MatrixDims(core[0], tuple(core[1:]))

    return jax.tree.map(one, param_names, is_leaf=lambda x: isinstance(x, tuple))


def decoupled_weight_decay(weight_decay: float, schedule, mask) -> optax.GradientTransformation:
    """Adds `-schedule(step) * wd * W` to the updates (AdamW-style decay for any optimizer)."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("decoupled_weight_decay needs the params")
        lr = schedule(state.count) if callable(schedule) else schedule
        m = mask(params) if callable(mask) else mask

        def decay(u, p, on):
            if isinstance(u, optax.MaskedNode) or not on:  # MaskedNode: frozen by optim.trainable
                return u
            return u - (lr * weight_decay * p).astype(u.dtype)

        masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
        updates = jax.tree.map(decay, updates, params, m, is_leaf=masked)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def _alias(name: str):
    if name not in OPTIMIZERS:
        import difflib

        close = difflib.get_close_matches(name, OPTIMIZERS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown optim.name {name!r}.{hint} Choose one of {', '.join(OPTIMIZERS)}")
    if name == "adamw":
        return optax.adam
    import nl_jax.optim as nl_optim

    return getattr(nl_optim, name)


def make_optimizer(optim_cfg, total_steps: int, param_names=None):
    """(tx, schedule) for `optim_cfg` (see experiments/configs/base.py `optim_config`).

    tx = chain(clip_by_global_norm, <optimizer>(schedule, **kwargs), decoupled weight decay).
    """
    schedule = schedules.from_config(optim_cfg, total_steps)
    name = optim_cfg.name
    fn = _alias(name)
    kwargs = dict(optim_cfg.get("kwargs", {}) or {})
    if name == "adamw":
        kwargs = dict(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, **kwargs)
    accepted = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"optim.kwargs {unknown} are not arguments of {name} (it takes {list(accepted)})")
    if "dims" in accepted and "dims" not in kwargs and param_names is not None:
        kwargs["dims"] = matrix_dims(param_names)
    parts = []
    if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    parts.append(fn(schedule, **kwargs))
    if optim_cfg.weight_decay:
        mask = (lambda p: decay_mask(p, param_names)) if param_names is not None else decay_mask
        parts.append(decoupled_weight_decay(optim_cfg.weight_decay, schedule, mask))
    tx = optax.chain(*parts)
    if optim_cfg.get("trainable"):
        if param_names is None:
            raise ValueError("optim.trainable needs param_names (a pytree like the params)")
        labels = trainable_labels(optim_cfg.trainable, param_names)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def trainable_labels(pattern: str, params):
    """`optim.trainable`: a regular expression searched in each parameter's path ("blocks/layers/cms/
    levels/0/mlp/up/kernel"); parameters it does not match are frozen (zero update, no optimizer
    state, no weight decay). Returns the labels of `optax.multi_transform` as a pytree like
    `params` (a tree, not a function of the params, so that optax can map the optimizer state's
    shardings to the params')."""
    import re

    regex = re.compile(pattern)
    is_leaf = lambda x: isinstance(x, tuple) and all(isinstance(n, str) for n in x)  # noqa: E731  logical names
    paths = jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), params, is_leaf=is_leaf
    )
    labels = jax.tree.map(lambda p: "train" if regex.search(p) else "frozen", paths)
    if "train" not in jax.tree.leaves(labels):
        raise ValueError(
            f"optim.trainable={pattern!r} matches no parameter path (they look like "
            f"{jax.tree.leaves(paths)[0]!r}): fix the pattern, or set it to '' to train every parameter"
        )
    return labels
