"""Memora's update: l2 attentional bias with KL-divergence retention (Miras, "It's All Connected: A
Journey Through Test-Time Memorization, Attentional Bias, Retention, and Online Optimization",
Behrouz et al. 2025, arXiv 2504.13173).

The KL retention makes each step a mirror-descent (exponentiated-gradient) step that keeps every row
of every fast-weight matrix on the scaled probability simplex {w >= 0, sum_i w_i = c} (c: `scale`):

    W_t = c Softmax_rows(alpha_t log W_{t-1} - eta_t dl2(W; k_t, v_t))

alpha_t (the retention gate) acts as a temperature on the old log-weights: alpha < 1 pulls each row
towards uniform. It is not a preset of the ops core (whose rules are linear in the state), so it has
its own three forms with one contract, `f(spec, state, q, k, v, rates, ...) -> (y, state)`.

Chunk semantics (as the rest of the core, docs/design.md, Decision 6, and the paper's parallel
training form): every gradient of a chunk is taken at the state of the chunk's start W_B. Inside a
chunk the memory is read with the paper's linear approximation (no log / softmax per token):

    g_i = dl2(W_B; k_i, v_i)
    W_i = alpha_i W_{i-1} - eta_i g_i            read y_i = M_{W_i}(q_i)   (post_update)
    L_i = alpha_i L_{i-1} - eta_i g_i            L_0 = log W_B

and the state handed to the next chunk is the exact KL step, W_B' = c Softmax_rows(L_C). Exact
because the softmax of each step only shifts every row of the log-weights by a constant, which the
next softmax removes: C per-token KL steps with gradients at W_B give Softmax_rows(L_C).

The chunked form runs the ops core's closed form for the reads and W_C (`closed_form.chunk_update`, the
l2 objective with retention alpha and rate eta), and gets L_C from it without a second pass: both
recurrences add the same gradients, so L_C = W_C + a_C (log W_B - W_B), a_C the product of the
chunk's alphas.

The approximation is the paper's, and it is coarse: to first order the KL step changes an entry by
-eta w (g - <w, g> / c), the linear one by -eta g, so inside a chunk the reads move about n / c times
faster (n: the row's length) than the state handed on, and may leave the simplex. Rows summing to c
keep the memory bounded (with c = 1 an MLP memory's output is z plus a convex combination of its
hidden activations); rows with entries near 1 (c = n) would match the two steps but make the
outputs grow with the width, and the outer gradients of memora_tiny then reach 1e9.

The token-by-token reference (`memora_naive`) runs both recurrences with `jax.grad`; decoding
(`memora_recurrent`) runs them with the rank-one gradient factors.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nl_jax.memory.ops import chunked, closed_form, update_rule
from nl_jax.memory.ops import structures as st


class MemoraState(NamedTuple):
    """What a Memora memory carries between calls.

    weights:  W_t, the read weights (inside a chunk: the linear approximation).
    logits:   L_t, the log-weights of the exact KL step, up to a constant per row.
    boundary: W_B, the state at the last chunk boundary, on the scaled simplex.
    step:     int32 scalar, tokens since the last chunk boundary.
    """

    weights: Any
    logits: Any
    boundary: Any
    step: jax.Array


def to_simplex(logits, scale: float):
    """(c Softmax_rows(L), log of it) for every matrix of a weights pytree; rows are the last axis."""
    log_w = jax.tree.map(lambda u: math.log(scale) + jax.nn.log_softmax(u, axis=-1), logits)
    return jax.tree.map(jnp.exp, log_w), log_w


def init_state(logits, scale: float) -> MemoraState:
    """A state at a chunk boundary whose weights are c Softmax_rows(logits)."""
    weights, log_w = to_simplex(logits, scale)
    return MemoraState(weights, log_w, weights, jnp.zeros((), jnp.int32))


def check_call(spec: st.MemorySpec, state: MemoraState, rates: update_rule.Rates, chunk_size: int) -> None:
    if not isinstance(state, MemoraState):
        got = type(state).__name__
        raise TypeError(f"a Memora memory needs a MemoraState (memora.init_state), got {got}")
    st.check_weights(spec, state.weights)
    if spec.objective != "l2" or spec.bias or spec.norm or spec.self_target or spec.max_grad_norm:
        raise ValueError(
            "Memora's memory is the plain l2 memory: MemorySpec(structure, 'l2', activation) without "
            f"bias, norm, self_target or max_grad_norm; got {spec}"
        )
    unused = ("momentum", "dgd", "delta_scale", "erase_key", "erase_dir")
    extra = [n for n in unused if getattr(rates, n) is not None]
    if extra or rates.retention is None or rates.retention.ndim != rates.lr.ndim:
        raise ValueError(
            "Memora takes rates lr and retention, one scalar per token and head each"
            + (f"; drop {', '.join(extra)}" if extra else "")
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _token(spec, state: MemoraState, q, k, rates, grads, chunk_size: int, scale: float):
    """One token from the gradients at the boundary: both recurrences, the read, the KL step at a
    chunk's end. Vectors [B, H, D], rates [B, H]."""
    weights, _ = update_rule.apply_update(spec, state.weights, None, grads, k, rates)
    logits, _ = update_rule.apply_update(spec, state.logits, None, grads, k, rates)
    y = st.apply(spec, weights, q[..., None, :])[..., 0, :]
    step = state.step + 1
    at_end = step >= chunk_size
    new_w, new_l = to_simplex(logits, scale)
    pick = lambda a, b: jax.tree.map(lambda x, z: jnp.where(at_end, x, z), a, b)  # noqa: E731
    weights, logits = pick(new_w, weights), pick(new_l, logits)
    boundary = pick(new_w, state.boundary)
    return y, MemoraState(weights, logits, boundary, jnp.where(at_end, 0, step).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size", "scale"))
def memora_recurrent(
    spec: st.MemorySpec, state: MemoraState, q, k, v, rates: update_rule.Rates, *, chunk_size: int, scale: float
):
    """One decode step: q, k, v [B, H, D], rates [B, H] -> (y [B, H, D], new state). Gradients from
    the rank-one factors of `structures.token_errors`."""
    check_call(spec, state, rates, chunk_size)
    one = lambda x: x[..., None, :]  # noqa: E731
    fac = st.token_errors(spec, state.boundary, one(k), one(v))
    grads = jax.tree.map(lambda e, x: jnp.einsum("...co,...ci->...oi", e, x), fac.errors, fac.inputs)
    return _token(spec, state, q, k, rates, grads, chunk_size, scale)


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size", "scale"))
def memora_naive(
    spec: st.MemorySpec, state: MemoraState, q, k, v, rates: update_rule.Rates, *, chunk_size: int, scale: float
):
    """The token-by-token reference: q, k, v [B, T, H, D], rates [B, T, H] -> (y [B, T, H, D], state).
    Gradients by `jax.grad` of the per-token loss (`structures.token_loss`) at the boundary state."""
    check_call(spec, state, rates, chunk_size)
    loss = jax.vmap(jax.vmap(functools.partial(st.token_loss, spec)))  # over batch and heads

    def step(s, xs):
        q, k, v, r = xs
        grads = jax.grad(lambda w: jnp.sum(loss(w, k, v)))(s.boundary)  # each row's loss sees its own W
        y, s = _token(spec, s, q, k, r, grads, chunk_size, scale)
        return s, y

    time_major = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), (q, k, v, rates))
    final, ys = jax.lax.scan(step, state, time_major)
    return jnp.moveaxis(ys, 0, 1), final


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size", "scale", "remat"))
def memora_chunked(
    spec: st.MemorySpec,
    state: MemoraState,
    q,
    k,
    v,
    rates: update_rule.Rates,
    *,
    chunk_size: int,
    scale: float,
    remat: bool = False,
    restart: jax.Array | None = None,
    initial: MemoraState | None = None,
):
    """The training form: shapes as `memora_naive`, the state at a chunk boundary and T a multiple
    of `chunk_size` (a ValueError otherwise). A `lax.scan` over chunks of the core's closed form.
    `restart` bool [B, T] (documents of packed rows): a row's state restarts from `initial` at each
    flagged token, which must be a chunk's first (as for `memory_chunked`; flags inside a chunk are
    not read)."""
    check_call(spec, state, rates, chunk_size)
    if (restart is None) != (initial is None):
        raise ValueError("restart and initial go together")
    t = q.shape[1]
    if t % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} does not divide the sequence length {t}")
    if not isinstance(state.step, jax.core.Tracer) and int(state.step) != 0:
        raise ValueError(
            f"memora_chunked needs a state at a chunk boundary, got one {int(state.step)} tokens into a "
            "chunk; continue it with memora_naive or memora_recurrent up to the boundary"
        )

    def body(carry, xs):
        if restart is not None:
            xs, flags = xs
            carry = chunked.restart_where(flags, (initial.weights, initial.logits), carry)
        w_b, log_b = carry
        q, k, v, r = xs
        y, w_c, _ = closed_form.chunk_update(spec, "post_update", w_b, None, w_b, q, k, v, r)
        a_c = jnp.prod(r.retention.astype(jnp.float32), axis=-1)[..., None, None]  # [B, H, 1, 1]
        logits = jax.tree.map(lambda w, lb, wb: w + a_c * (lb - wb), w_c, log_b, w_b)
        return to_simplex(logits, scale), y

    if remat:
        body = jax.checkpoint(body)
    xs = jax.tree.map(lambda x: chunked.to_chunks(x, chunk_size), (q, k, v, rates))
    if restart is not None:
        xs = (xs, chunked.chunk_restarts(restart, chunk_size))
    (weights, logits), ys = jax.lax.scan(body, (state.weights, state.logits), xs)
    return chunked.from_chunks(ys), MemoraState(weights, logits, weights, jnp.zeros((), jnp.int32))
