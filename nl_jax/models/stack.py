"""A stack of L identical blocks with stacked parameters, applied by scan (or a loop, to debug).

Block interface (what a block class must provide):

    block(x: [B, T, D], state) -> (y: [B, T, D], new_state)
        state is None for a training forward (return None); otherwise it is this layer's
        recurrent / decode state (a KV cache, a memory's fast weights, conv tails ...).
        x may be any pytree (the scan carry) as long as y has the same structure.
    block.init_state(batch_size, max_len=None) -> state    (only for models that decode; max_len
        sizes attention caches, recurrent blocks ignore it)

Parameters are created once, stacked along a leading 'layers' axis (nnx.split_rngs + nnx.vmap,
the axis name inserted into each Param's logical names), and the same stacked layout is used
with scan_layers=True or False, so checkpoints do not depend on the flag. Per-layer states are
stacked the same way (leading axis L); an unrolled stack also takes any part of them as `Layers`
(layer i's at item i), which it reads and returns without slicing or stacking, for a caller that
carries the states through a loop of its own (HOPE's ntp segment scan).

Forward (MaxText nnx_decoders recipe): split the stack into graphdef / Params / rest once, scan a
body that merges one layer's slice and returns only the non-Param state (plus the block state).
Returning the whole module from the body would stack a second copy of the read-only params
(MaxText commit 655c636dd: ~12.7 GiB of HBM).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.parallel.rules import constrain_batch

_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation for the backward pass
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_POLICIES = tuple(_POLICIES)


class Layers(tuple):
    """Per-layer values, layer i's at item i: a state part an unrolled stack uses as it is (a
    stacked array's slices would be copied out of it and its new values stacked again in the forward,
    and, in the backward, every layer's cotangent padded to the whole stack and summed)."""


jax.tree_util.register_pytree_node(Layers, lambda t: (tuple(t), None), lambda _, items: Layers(items))


def _is_layers(a) -> bool:
    return isinstance(a, Layers)


def to_layers(tree, num_layers: int):
    """A stacked (leading axis L) pytree as Layers of its per-layer pytrees."""
    return Layers(jax.tree.map(lambda a: a[i], tree) for i in range(num_layers))


def from_layers(layers: Layers):
    """Layers of per-layer pytrees, stacked along a leading axis L."""
    return jax.tree.map(lambda *a: jnp.stack(a), *layers)


def get_remat_policy(name: str):
    """jax.checkpoint policy by config name (None for 'none': no remat)."""
    if name not in _POLICIES:
        raise ValueError(f"unknown remat_policy {name!r}; choose one of {REMAT_POLICIES}")
    return _POLICIES[name]


class Stack(nnx.Module):
    """L stacked copies of `make_block(rngs)`; call as stack(x, states=None, **kwargs)."""

    def __init__(
        self,
        make_block: Callable[[nnx.Rngs], nnx.Module],
        num_layers: int,
        *,
        scan_layers: bool = True,
        remat_policy: str = "none",
        rngs: nnx.Rngs,
    ):
        get_remat_policy(remat_policy)  # fail at build time, not at the first step
        self.num_layers, self.scan_layers, self.remat = num_layers, scan_layers, remat_policy

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(
            in_axes=(0,), out_axes=0, axis_size=num_layers, transform_metadata={nnx.PARTITION_NAME: "layers"}
        )
        def make(r):
            return make_block(r)

        self.layers = make(rngs)

    def _slice(self, i: int):
        """Layer i as a module of its own (to inspect one layer)."""
        graphdef, params, rest = nnx.split(self.layers, nnx.Param, ...)
        take = lambda a: a[i]  # noqa: E731
        return nnx.merge(graphdef, jax.tree.map(take, params), jax.tree.map(take, rest))

    def init_state(self, *args, **kwargs):
        """Per-layer states from block.init_state(*args, **kwargs), stacked along a leading axis L.

        Each layer builds its own (vmap over the stacked parameters): a state may start from that
        layer's parameters (a memory's meta-learned initial weights). The states are laid out with
        the batch (axis 1), not like the parameters they may be broadcast from."""
        graphdef, params, rest = nnx.split(self.layers, nnx.Param, ...)
        one = lambda p, r: nnx.merge(graphdef, p, r).init_state(*args, **kwargs)  # noqa: E731
        return constrain_batch(jax.vmap(one)(params, rest), axis=1)

    def __call__(self, x: jax.Array, states=None, **kwargs):
        """Applies the L blocks in order; kwargs are passed to every block (static values, or arrays
        every layer reads alike, such as segment ids, closed over by the scan body).

        Returns (y, new_states) with new_states stacked along L, but for the parts given as Layers
        (None when states is None).
        """
        graphdef, params, rest = nnx.split(self.layers, nnx.Param, ...)

        def body(h, layer):
            p, r, s = layer
            block = nnx.merge(graphdef, p, r)
            h, s = block(h, s, **kwargs)
            return h, (nnx.state(block, nnx.Not(nnx.Param)), s)

        policy = get_remat_policy(self.remat)
        if self.remat != "none":
            # Inside scan CSE across iterations is impossible anyway, so prevent_cse can be off there.
            body = jax.checkpoint(body, policy=policy, prevent_cse=not self.scan_layers)

        if self.scan_layers:
            if any(map(_is_layers, jax.tree.leaves(states, is_leaf=_is_layers))):
                raise ValueError("states given as Layers need an unrolled stack (scan_layers=False)")
            x, (rest, states) = jax.lax.scan(body, x, (params, rest, states))
        else:
            outs = []
            for i in range(self.num_layers):
                layer = jax.tree.map(lambda a, i=i: a[i], (params, rest, states), is_leaf=_is_layers)
                x, out = body(x, layer)
                outs.append(out)
            template = (rest, states)  # Layers parts come back as Layers, stacked parts stacked
            restack = lambda t, *a: Layers(a) if _is_layers(t) else jnp.stack(a)  # noqa: E731
            rest, states = jax.tree.map(restack, template, *outs, is_leaf=_is_layers)
        # Non-Param state (counters, RNG keys) is written back. Under jax.grad the caller must merge
        # with nnx.merge(..., copy=True): Variables reused from a non-differentiated input belong
        # to the outer trace and cannot be written inside the gradient trace.
        nnx.update(self.layers, rest)
        return x, states
