"""Train state: a plain pytree `{"step", "params", "opt_state"}`, built directly in its sharded layout.

The model is kept functional: `ModelFn` holds the NNX graphdef, an abstract template of the
Params and the (constant) non-Param state, and `apply(params, tokens)` merges them inside jit.
`params` is a pure nested dict of arrays (`nnx.State.to_pure_dict()`), so optax, orbax and jit
shardings see ordinary pytrees. Shapes come first (`jax.eval_shape`), then shardings from the
logical-axis rules, then `jit(init, out_shardings=...)`: nothing is materialised unsharded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nl_jax.models.registry import build_model, get_model_class
from nl_jax.parallel.rules import LOGICAL_AXIS_RULES, state_shardings


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelFn:
    """A registered model as a pure function of its parameters."""

    cls: type
    cfg: Any
    graphdef: Any
    template: Any  # abstract nnx.State of the Params (Variables with ShapeDtypeStruct values)
    rest: Any  # non-Param state (concrete; empty for most models)
    documents: str = "reset"  # data.document_boundaries, read where "mask" and "reset" differ

    @classmethod
    def from_config(cls, model_cfg, seed: int = 0, documents: str = "reset") -> "ModelFn":
        """Builds nothing: the graph and parameter shapes come from `nnx.eval_shape`. `documents`:
        what segment ids given to `apply` mean (data.document_boundaries)."""
        model_cls = get_model_class(model_cfg.name)
        make = lambda: build_model(model_cfg, nnx.Rngs(seed))
        graphdef, template, _ = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
        _, _, rest = nnx.split(make(), nnx.Param, ...) if _has_rest(make) else (None, None, nnx.State({}))
        return cls(model_cls, model_cfg, graphdef, template, rest, documents)

    def apply(self, params, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """logits float32 [B, T, V] for tokens int32 [B, T]; `segment_ids` int32 [B, T] only for a
        model that reads them (data.document_boundaries other than "ignore")."""
        state = jax.tree.map(lambda x: x, self.template, is_leaf=_is_var)
        nnx.replace_by_pure_dict(state, params)
        module = self.module(state)
        if segment_ids is None:
            return module(tokens)
        if getattr(self.cls, "mask_carries_memory", False):
            return module(tokens, segment_ids=segment_ids, restart=self.documents == "reset")
        return module(tokens, segment_ids=segment_ids)

    def module(self, param_state) -> nnx.Module:
        return nnx.merge(self.graphdef, param_state, self.rest, copy=True)

    def abstract_params(self):
        """Pure dict of ShapeDtypeStruct."""
        return self.template.to_pure_dict()

    def param_names(self):
        """Pure dict of each parameter's logical axis names (a tuple; () when it has none)."""
        names = jax.tree.map(
            lambda v: tuple(v.get_metadata().get("out_sharding") or ()), self.template, is_leaf=_is_var
        )
        return _pure_dict_of(names)

    def param_shardings(self, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
        """Pure dict of NamedSharding from the logical-axis rules."""
        return state_shardings(self.template, mesh, rules).to_pure_dict()

    def param_count(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_params()))


def _has_rest(make) -> bool:
    _, _, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    return bool(jax.tree.leaves(rest))


def _pure_dict_of(state):
    """Like State.to_pure_dict, for a State whose Variable values are arbitrary python objects."""

    def convert(node):
        if isinstance(node, nnx.Variable):
            return node.get_value()
        if hasattr(node, "items"):
            return {k: convert(v) for k, v in node.items()}
        return node

    return convert(state)


def opt_state_shardings(tx, abstract_params, param_shardings, mesh: Mesh):
    """Optimizer-state shardings that follow the params' (Auto-mode gotcha: `jit(tx.init)` would
    otherwise replicate them). Param-shaped leaves take their param's sharding; anything else
    (counts, per-parameter state of another shape, e.g. a deep-momentum MLP) is replicated."""
    replicated = NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)

    def follow(leaf, sharding, param):
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape == param.shape:
            return sharding
        return jax.tree.map(lambda _: replicated, leaf)

    return optax.tree_map_params(
        tx,
        follow,
        abstract_opt,
        param_shardings,
        abstract_params,
        transform_non_params=lambda _: replicated,
        # MaskedNode: where `optim.trainable` froze a parameter, its optimizer state holds none
        is_leaf=lambda x: isinstance(x, (jax.ShapeDtypeStruct, optax.MaskedNode)),
    )


def state_shardings_for(model: ModelFn, tx, mesh: Mesh) -> dict:
    """Shardings of the whole train state."""
    params_sh = model.param_shardings(mesh)
    return {
        "step": NamedSharding(mesh, P()),
        "params": params_sh,
        "opt_state": opt_state_shardings(tx, model.abstract_params(), params_sh, mesh),
    }


def abstract_train_state(model: ModelFn, tx, shardings: dict) -> dict:
    """ShapeDtypeStructs with shardings (the orbax restore target)."""
    params = model.abstract_params()
    shapes = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": params,
        "opt_state": jax.eval_shape(tx.init, params),
    }
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def train_state_from_params(params, tx, shardings: dict) -> dict:
    """A step-0 train state around given parameters (a parameters-only checkpoint), with a fresh
    optimizer state, laid out by `shardings`."""

    def init(params):
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    return jax.jit(init, out_shardings=shardings)(params)


def init_train_state(model: ModelFn, tx, shardings: dict, seed: int) -> dict:
    """Fresh parameters from `seed` and a fresh optimizer state, created sharded."""
    cfg = model.cfg

    def init():
        params = nnx.split(build_model(cfg, nnx.Rngs(seed)), nnx.Param, ...)[1].to_pure_dict()
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    return jax.jit(init, out_shardings=shardings)()
