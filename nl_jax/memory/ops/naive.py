"""The token-by-token reference: a `lax.scan` over tokens, gradients by `jax.grad`.

This is the readable source of truth that the chunked training path is tested against. It has the
same mini-batch semantics as the chunked form for any `chunk_size` (gradients at the state of the
last chunk boundary), and the same contract: inputs [B, T, H, D], rates [B, T, H], a `MemoryState`
in and out. It is slow by design: one small update per token.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp

from nl_jax.memory.ops import update_rule
from nl_jax.memory.ops import structures as st


def _head_step(spec: st.MemorySpec, chunk_size: int, read: str, state: st.MemoryState, q, k, v, rates, norm):
    """One token for one head: unbatched weights [O, I], vectors [D], scalar rates, norm [D]."""

    def read_with(weights):  # W_B + tau (W - W_B) with a delta scale tau
        if rates.delta_scale is not None:
            weights = jax.tree.map(lambda b, w: b + rates.delta_scale * (w - b), state.boundary, weights)
        return st.apply(spec, weights, q[None], norm)[0]

    if read != "post_update":
        y = read_with(state.boundary if read == "boundary" else state.weights)
    target = st.targets(spec, state.boundary, v[None], norm)[0]  # a constant of the inner problem
    grads = st.clip_grads(spec, jax.grad(st.token_loss, argnums=1)(spec, state.boundary, k, target, norm))
    weights, momentum = update_rule.apply_update(spec, state.weights, state.momentum, grads, k, rates)
    if read == "post_update":
        y = read_with(weights)
    return y, update_rule.advance(state, weights, momentum, chunk_size, rates.delta_scale)


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size", "read"))
def memory_naive(
    spec: st.MemorySpec,
    state: st.MemoryState,
    q,
    k,
    v,
    rates: update_rule.Rates,
    *,
    chunk_size: int = 1,
    read: str = "per_token",
    norm: st.InnerNorm | None = None,
):
    """Reference form. q, k [B, T, H, Dk], v [B, T, H, Dv]; returns (y [B, T, H, Dv], final state).

    Streams across calls at any split point: the state carries the boundary weights and the
    position inside the current chunk. `norm`: the inner LayerNorm of a `norm` memory.
    """
    update_rule.check_call(spec, state, rates, read, chunk_size, norm)
    b, _, h = q.shape[:3]
    if norm is not None:  # one copy per batch row and head, for the vmaps below
        norm = jax.tree.map(lambda p: jnp.broadcast_to(p, (b, h, p.shape[-1])), norm)
    step = lambda s, q, k, v, r, n: _head_step(spec, chunk_size, read, s, q, k, v, r, n)  # noqa: E731
    # vmap over heads then batch; the step counter is shared by all of them.
    axes = st.MemoryState(0, 0, 0, None)
    per_head = jax.vmap(step, in_axes=(axes, 0, 0, 0, 0, 0), out_axes=(0, axes))
    per_batch = jax.vmap(per_head, in_axes=(axes, 0, 0, 0, 0, 0), out_axes=(0, axes))

    def scan_step(carry, xs):
        y, carry = per_batch(carry, *xs, norm)
        return carry, y

    xs = (q, k, v, rates)
    time_major = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), xs)  # scan over T
    final, ys = jax.lax.scan(scan_step, state, time_major)
    return jnp.moveaxis(ys, 0, 1), final
