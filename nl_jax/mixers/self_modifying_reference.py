"""The token-by-token reference of the self-modifying Titans layer (nl_jax/mixers/self_modifying.py),
kept apart from the chunked path as memory/ops/naive.py is from memory/ops/chunked.py: the
equivalence tests and `benchmarks.self_modifying` compare the layer against it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nl_jax.memory import ops
from nl_jax.mixers.self_modifying import SelfModifyingState, SelfModifyingTitans


def reference_forward(layer: SelfModifyingTitans, x: jax.Array, state: SelfModifyingState | None = None):
    """The token-by-token reference of the whole layer: a `lax.scan` over tokens, each memory updated
    by `ops.memory_naive` (inner gradients by `jax.grad`), built apart from the chunked path.
    Same contract as the layer's call, except that it always returns the final state."""
    b = x.shape[0]
    state = layer.init_state(b) if state is None else state
    z, beta, convs = layer.paths(x, state.conv)
    to_block = lambda a: a[:, :, None]  # noqa: E731  [B, H, ...] -> [B, H, 1, ...]
    to_seq = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  [B, H, 1, ...] -> [B, 1, H, ...]

    def step(carry, inputs):
        mems, memory = carry
        zt, bt = inputs
        boundary = layer.stack_small(mems).boundary
        q, k, v, rates = layer.generate(boundary, jax.tree.map(to_block, zt), jax.tree.map(to_block, bt))
        q, k, v, rates = jax.tree.map(to_seq, (q, k, v, rates))
        naive = lambda spec, s, c, read: ops.memory_naive(spec, s, q, k, v, rates, chunk_size=c, read=read)  # noqa: E731
        mems = {n: naive(layer.spec, s, layer.chunk_size, "boundary")[1] for n, s in mems.items()}
        y, memory = naive(layer.out_spec, memory, layer.memory_chunk_size, layer.read)
        return (mems, memory), y[:, 0]

    time_major = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (z, beta))
    (mems, memory), ys = jax.lax.scan(step, (layer.small_states(state.memories), state.memory), time_major)
    y = jnp.moveaxis(ys, 0, 1)
    return layer.output(x, y), SelfModifyingState(convs, layer.stack_small(mems), memory)
