"""The chunked training form: `lax.scan` over chunks, batched matmuls inside each chunk.

Within a chunk of C tokens every gradient is taken at the boundary state (docs/design.md, Decision 6),
which gives closed forms for the whole chunk (`closed_form.chunk_update`; the algebra is in that
module). This module drives them over sequences.

The same closed form starts from a running state partway into a chunk (gradients still at the
chunk's boundary state, the closed form's W_0 then being the running state) and stops at any token
(`chunk_update`). That gives the streaming form `memory_stream` (any length from any position,
one or two passes per block of C tokens, see `stream_blocks`), which layers whose keys and rates
come from other memories (self-modifying Titans) drive with their own block function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nl_jax.memory.ops import structures as st
from nl_jax.memory.ops import update_rule
from nl_jax.memory.ops.closed_form import _select, chunk_update

IMPLS = ("xla", "pallas")  # memory_chunked's implementations


def _chunk(spec: st.MemorySpec, read: str, norm, carry, xs):
    weights, momentum = carry
    y, weights, momentum = chunk_update(spec, read, weights, momentum, weights, *xs, norm=norm, close=True)
    return (weights, momentum), y


def to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """[B, T, H, ...] -> [N, B, H, C, ...] with T = N C."""
    b, t, h = x.shape[:3]
    x = x.reshape(b, t // chunk_size, chunk_size, h, *x.shape[3:])
    return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)


def from_chunks(y: jax.Array) -> jax.Array:
    """[N, B, H, C, ...] -> [B, N C, H, ...]."""
    n, b, h, c = y.shape[:4]
    return jnp.moveaxis(y, 3, 2).swapaxes(0, 1).reshape(b, n * c, h, *y.shape[4:])


def chunk_restarts(restart: jax.Array, chunk_size: int) -> jax.Array:
    """bool [B, T] (a document starts at the token) -> [N, B], the flag of each chunk's first token.
    Flags inside a chunk are not read: callers check that documents start on the chunk grid."""
    return jnp.swapaxes(restart[:, ::chunk_size], 0, 1)


def restart_where(flags: jax.Array, initial, current, batch_axis: int = 0):
    """The rows whose flag [B] is set take `initial`, the others keep `current` (same pytrees).

    A select, not a retention of 0: the state restarts from its meta-learned initial value, and the
    outer gradient reaches that value from every restart."""

    def pick(a, b):
        shape = [1] * b.ndim
        shape[batch_axis] = flags.shape[0]
        return jnp.where(flags.reshape(shape), a.astype(b.dtype), b)

    return jax.tree.map(pick, initial, current)


def _advance_block(block_fn, states, step, xs, chunk_size: int, n: int, within: bool = False):
    """n <= chunk_size tokens from `step` tokens into a chunk: they cross at most one chunk boundary.

    Pass 1 runs the block from the current boundary and stops at the boundary (token p - 1, with
    p = chunk_size - step) or at the block's end. If the boundary falls inside the block, pass 2
    runs the remaining tokens, rotated to the front, from the new boundary. Both passes are the
    closed form of `chunk_update`; pass 2 only runs when needed (`lax.cond`). `within` (static):
    the caller guarantees step + n <= chunk_size, so pass 1 is all there is.
    """
    static = isinstance(step, int)
    p = chunk_size - step
    new_step = (step + n) % chunk_size
    step_arr = lambda s: jnp.asarray(s, jnp.int32)  # noqa: E731
    last = min(p, n) - 1 if static else (n - 1 if within else jnp.minimum(p, n) - 1)
    ys1, upd = block_fn(states, xs, last)
    cross = p <= n
    # after a crossing, pass 2 starts at position 0 of the new chunk (new_step is its end)
    first_step = (0 if cross else new_step) if static else jnp.where(cross, 0, new_step)
    first = {
        name: st.MemoryState(w, m, _select(cross, w, states[name].boundary), step_arr(first_step))
        for name, (w, m) in upd.items()
    }

    def second(args):
        mid, ys1 = args
        roll = lambda x, shift: jnp.roll(x, shift, axis=2)  # noqa: E731  (the token axis of [B, H, n, ...])
        ys2, upd2 = block_fn(mid, jax.tree.map(lambda x: roll(x, -p), xs), n - p - 1)
        before = jnp.arange(n) < p
        ys = jax.tree.map(
            lambda a, b: jnp.where(before.reshape((1, 1, n) + (1,) * (a.ndim - 3)), a, roll(b, p)), ys1, ys2
        )
        new = {
            name: st.MemoryState(w, m, mid[name].boundary, step_arr(new_step))
            for name, (w, m) in upd2.items()
        }
        return ys, new

    if static:
        return second((first, ys1)) if p < n else (ys1, first)
    if n == 1 or within:  # no boundary before the block's end: one token, or kept inside by the caller
        return ys1, first
    return jax.lax.cond(p < n, second, lambda args: (args[1], args[0]), (first, ys1))


def stream_blocks(
    block_fn,
    states: dict,
    step,
    xs,
    chunk_size: int,
    *,
    remat: bool = False,
    restart: jax.Array | None = None,
    initial: dict | None = None,
    batch_axis: int = 0,
    within_chunk: bool = False,
):
    """Run any number of tokens through memories that share one chunk size, from any position.

    `states` maps names to `MemoryState`s that are `step` tokens into the current chunk (a python
    int when known statically, else an int32 scalar); `xs` is a pytree of [B, T, H, ...] inputs.
    `block_fn(states, xs_block, last) -> (ys_block, updates)` handles a block of tokens in chunk
    layout ([B, H, n, ...]) that lie in one chunk: inputs, reads and gradients from each state's
    `boundary`, and `updates[name] = (weights, momentum)` after token `last` (see `chunk_update`).
    Returns (ys [B, T, H, ...], new states). Full blocks of `chunk_size` tokens go through a
    `lax.scan`; each crosses at most one chunk boundary, so it costs one or two closed-form passes
    (`_advance_block`); the remainder is one more block.

    `restart` bool [B, T] (documents of packed rows): at a flagged token, which must be a chunk's
    first one, a row's states restart from `initial` (name -> (weights, momentum), the batch on
    `batch_axis`). Only from a chunk boundary over whole chunks.

    `within_chunk` (static): the caller guarantees that the tokens end at or before the boundary of
    the chunk they start in (a model's segments that divide the chunk, started at multiples of
    themselves). They then run as one pass, without the branch for a crossing, whose transpose
    would keep the update on the path of a backward that needs the reads alone (HOPE's inner
    gradient).
    """
    t = jax.tree.leaves(xs)[0].shape[1]
    if within_chunk:
        if t > chunk_size or restart is not None:
            raise ValueError(f"within_chunk: {t} tokens must fit in one chunk of {chunk_size}, without restarts")
        blocks = jax.tree.map(lambda x: to_chunks(x, t)[0], xs)
        ys, states = _advance_block(block_fn, states, step, blocks, chunk_size, t, within=True)
        return jax.tree.map(lambda y: from_chunks(y[None]), ys), states
    n_full, rest = divmod(t, chunk_size)
    if isinstance(step, int) and step == 0 and not rest:
        return _whole_chunks(block_fn, states, xs, chunk_size, remat, restart, initial, batch_axis)
    if restart is not None:
        raise ValueError("restarts at document starts need whole chunks from a chunk boundary")
    outs = []
    if n_full:

        def body(states, xs_block):
            ys, states = _advance_block(block_fn, states, step, xs_block, chunk_size, chunk_size)
            return states, ys

        if remat:
            body = jax.checkpoint(body)
        full = jax.tree.map(lambda x: to_chunks(x[:, : n_full * chunk_size], chunk_size), xs)
        states, ys = jax.lax.scan(body, states, full)
        outs.append(jax.tree.map(from_chunks, ys))
    if rest:  # a full block leaves the position in the chunk unchanged, so the remainder starts at `step`
        tail = jax.tree.map(lambda x: to_chunks(x[:, n_full * chunk_size :], rest)[0], xs)
        ys, states = _advance_block(block_fn, states, step, tail, chunk_size, rest)
        outs.append(jax.tree.map(lambda y: from_chunks(y[None]), ys))
    ys = jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=1), *outs)
    return ys, states


def scan_chunks(body, carry, xs):
    """`lax.scan` of `body` over the leading (chunk) axis of xs; one chunk runs the body directly.
    A scan's transpose instantiates a zero cotangent of its final carry, so a caller that
    differentiates the reads alone (HOPE's inner gradient) would run the whole update's backward on
    zeros; unscanned, the update's backward is dead code and dropped."""
    if jax.tree.leaves(xs)[0].shape[0] != 1:
        return jax.lax.scan(body, carry, xs)
    carry, ys = body(carry, jax.tree.map(lambda a: a[0], xs))
    return carry, jax.tree.map(lambda a: a[None], ys)


def _whole_chunks(block_fn, states: dict, xs, chunk_size: int, remat: bool, restart, initial, batch_axis):
    """`stream_blocks` from a chunk boundary over whole chunks: every block starts at a boundary, so
    the boundary state is the running one and the scan carries the weights and momenta alone."""
    zero = jnp.zeros((), jnp.int32)
    xs = jax.tree.map(lambda x: to_chunks(x, chunk_size), xs)
    if restart is not None:
        xs = (xs, chunk_restarts(restart, chunk_size))

    def body(carry, xs_block):
        if restart is not None:
            xs_block, flags = xs_block
            carry = restart_where(flags, initial, carry, batch_axis)
        at_boundary = {n: st.MemoryState(w, m, w, zero) for n, (w, m) in carry.items()}
        ys, updates = block_fn(at_boundary, xs_block, chunk_size - 1)
        return updates, ys

    if remat:
        body = jax.checkpoint(body)
    carry = {n: (s.weights, s.momentum) for n, s in states.items()}
    carry, ys = scan_chunks(body, carry, xs)
    return jax.tree.map(from_chunks, ys), {n: st.MemoryState(w, m, w, zero) for n, (w, m) in carry.items()}


def memory_chunked(
    spec: st.MemorySpec,
    state: st.MemoryState,
    q,
    k,
    v,
    rates: update_rule.Rates,
    *,
    chunk_size: int,
    read: str = "per_token",
    remat: bool = False,
    norm: st.InnerNorm | None = None,
    impl: str = "xla",
    interpret: bool | None = None,
    restart: jax.Array | None = None,
    initial: st.MemoryState | None = None,
):
    """Training form. q, k [B, T, H, Dk], v [B, T, H, Dv], rates [B, T, H] -> (y [B, T, H, Dv], state).

    `state` must sit at a chunk boundary (as `init_state` and every chunked call leave it; checked
    when the state is concrete), and the sequence length must be a multiple of `chunk_size`.
    `remat` recomputes each chunk in the backward pass instead of storing its intermediates.
    `norm`: the inner LayerNorm parameters of a `norm` memory.
    `impl`: "xla" (this module) or "pallas" (`pallas_chunked`: the linear and MLP memories without
    biases, inner LayerNorm, self targets, clipping or delta scales; other specs raise).
    `interpret` (pallas only): Pallas interpret mode; None picks it when lowering for CPU.
    `remat` has no effect there (its backward kernel recomputes each chunk from the saved states).
    `restart` bool [B, T] (documents of packed rows, xla only): a row's state restarts from `initial`
    (a state at a boundary, e.g. the meta-learned one) at each flagged token, which must be a
    chunk's first: restarts inside a chunk would change the chunk's gradient base, so the caller
    checks that documents start on the chunk grid (flags inside a chunk are not read).
    Vector gates (`update_rule`: per-channel retention, erase_key / erase_dir) run `vector_chunked`.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(state.step, jax.core.Tracer) and int(state.step) != 0:
        raise ValueError(
            f"memory_chunked needs a state at a chunk boundary, got one {int(state.step)} tokens into a chunk; "
            "continue it with memory_naive or memory_recurrent up to the boundary"
        )
    if (restart is None) != (initial is None):
        raise ValueError("restart and initial go together")
    if update_rule.has_vector_gates(rates):
        if impl != "xla":
            raise ValueError("vector gates (per-channel retention, erase_key / erase_dir) need impl='xla'")
        if restart is not None:
            raise ValueError("vector gates do not take restart flags; restart with a retention of 0 instead")
        # imported here: vector_chunked builds on this module's coefficients
        from nl_jax.memory.ops.vector_chunked import memory_chunked_vector

        return memory_chunked_vector(
            spec, state, q, k, v, rates, chunk_size=chunk_size, read=read, remat=remat, norm=norm
        )
    if impl == "pallas":
        if restart is not None:
            raise ValueError("impl='pallas' does not restart at document starts; use impl='xla'")
        # imported here: pallas_chunked builds on this module's coefficients
        from nl_jax.memory.ops import pallas_chunked

        return pallas_chunked.memory_chunked_pallas(
            spec, state, q, k, v, rates, chunk_size=chunk_size, read=read, interpret=interpret, norm=norm
        )
    return _memory_chunked(
        spec,
        state,
        q,
        k,
        v,
        rates,
        chunk_size=chunk_size,
        read=read,
        remat=remat,
        norm=norm,
        restart=restart,
        initial=initial,
    )


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size", "read", "remat"))
def _memory_chunked(
    spec: st.MemorySpec,
    state: st.MemoryState,
    q,
    k,
    v,
    rates: update_rule.Rates,
    *,
    chunk_size: int,
    read: str = "per_token",
    remat: bool = False,
    norm: st.InnerNorm | None = None,
    restart: jax.Array | None = None,
    initial: st.MemoryState | None = None,
):
    update_rule.check_call(spec, state, rates, read, chunk_size, norm)
    t = q.shape[1]
    if t % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} does not divide the sequence length {t}")
    xs = jax.tree.map(lambda x: to_chunks(x, chunk_size), (q, k, v, rates))
    if restart is None:
        body = lambda carry, x: _chunk(spec, read, norm, carry, x)  # noqa: E731
    else:
        xs = (xs, chunk_restarts(restart, chunk_size))
        start = (initial.weights, initial.momentum)

        def body(carry, x):
            x, flags = x
            return _chunk(spec, read, norm, restart_where(flags, start, carry), x)

    if remat:
        body = jax.checkpoint(body)
    (weights, momentum), ys = scan_chunks(body, (state.weights, state.momentum), xs)
    return from_chunks(ys), st.MemoryState(weights, momentum, weights, jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size", "read", "remat", "within_chunk"))
def memory_stream(
    spec: st.MemorySpec,
    state: st.MemoryState,
    q,
    k,
    v,
    rates: update_rule.Rates,
    *,
    chunk_size: int,
    read: str = "per_token",
    remat: bool = False,
    norm: st.InnerNorm | None = None,
    within_chunk: bool = False,
):
    """Streaming form: any number of tokens from any position inside a chunk, same shapes as
    `memory_chunked`; equal to `memory_naive` with the same chunk size.

    Closed forms throughout (no per-token loop): a block of up to `chunk_size` tokens crosses at
    most one chunk boundary and costs one or two chunk passes, so a call costs at most twice the
    chunked form. Segments shorter than a chunk (a model run in segments, prefill, a decode step)
    continue exactly where the last call stopped. `within_chunk` (static): the tokens end at or
    before the current chunk's boundary, one pass (`stream_blocks`).
    """
    update_rule.check_call(spec, state, rates, read, chunk_size, norm)
    if update_rule.has_vector_gates(rates):
        raise ValueError("memory_stream does not cover vector gates: use memory_chunked from a boundary")

    def block_fn(states, xs, last):
        s = states["m"]
        close = False if rates.delta_scale is None else s.step + last + 1 >= chunk_size
        y, w, m = chunk_update(
            spec, read, s.weights, s.momentum, s.boundary, *xs, last=last, norm=norm, close=close
        )
        return y, {"m": (w, m)}

    y, states = stream_blocks(
        block_fn, {"m": state}, state.step, (q, k, v, rates), chunk_size, remat=remat, within_chunk=within_chunk
    )
    return y, states["m"]
