"""The chunked training form: `lax.scan` over chunks, batched matmuls inside each chunk.

Within a chunk of C tokens every gradient is taken at the boundary state W_0 (docs/design.md, Decision 6), so
the rank-one factors e_i x_i^T of all tokens are known up front (`structures.token_errors`). The rule of
`update_rule.py` is linear in the state, which gives closed forms for every weight matrix of the memory:

  W_i = a_i W_0 + mu_i S_0 - sum_{s<=i} Cm[i,s] eta_s e_s x_s^T - sum_{s<=i} A[i,s] gamma_s p_s k_s^T
  S_i = b_i S_0 - sum_{s<=i} Bm[i,s] eta_s e_s x_s^T

with A[i,s] = prod_{s<r<=i} alpha_r, Bm the same for beta, a_i / b_i the prefix products, Cm = A Bm
(momentum folded into retention) and mu = A b. The last sum is the DGD term (input-side weight only,
where x_s = k_s); it needs the predictions of the running state p_i = W_{i-1} k_i, which solve the
unit lower-triangular system

  (I + (A' * K K^T) diag(gamma)) P = a' (K W_0^T) + mu' (K S_0^T) - (Cm' * K K^T)(eta E)

(primes: the matrices shifted down one row, i.e. the state before token i; the UT/WY trick of
DeltaNet). Reads are the same sums applied to queries: `per_token` uses the shifted matrices
(W_{i-1} q_i), `post_update` the unshifted ones (W_i q_i), `boundary` just W_0. For the MLP memory
the read of the input-side weight gives the hidden pre-activation, which is then read through the
output-side weight. Cost per chunk: O(C^2 D + C D^2) in matmuls and the inverse of one C x C
unit lower-triangular matrix (log2 C levels of batched matmuls).

Fast biases are weight matrices on the constant input 1, so they get tracks like any other matrix.
The inner LayerNorm is not a fast weight: it enters through the errors (`structures.token_errors`)
and through the reads (`structures.forward` over the tracks' products). A `delta_scale` tau_i
(TTT's token_idx, see `update_rule`) turns each product read into W_B q + tau_i (W q - W_B q), and the
state handed on at the chunk's end into W_B + tau_last (W - W_B).

The same closed form starts from a running state partway into a chunk (gradients still at the
chunk's boundary state, W_0 above then being the running state) and stops at any token
(`chunk_update`). That gives the streaming form `memory_stream` (any length from any position,
one or two passes per block of C tokens, see `stream_blocks`), which layers whose keys and rates
come from other memories (self-modifying Titans) drive with their own block function.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nl_jax.memory.ops import update_rule
from nl_jax.memory.ops import structures as st

IMPLS = ("xla", "pallas")  # memory_chunked's implementations


@jax.custom_vjp
def segment_products(x: jax.Array) -> jax.Array:
    """P[..., i, s] = prod_{s < r <= i} x_r for s <= i, else 0.

    A cumulative product per column: exact with rates of exactly 0 in value and in gradient (a
    saturated sigmoid gate does reach 0 in float32), where exp of summed logs would not be. The
    gradient is one matmul (`_segment_products_bwd`) instead of the transpose of the scan.
    """
    c = x.shape[-1]
    i = jnp.arange(c)[:, None]
    s = jnp.arange(c)[None, :]
    factors = jnp.where(i > s, x[..., :, None], jnp.ones((), x.dtype))  # row r, column s: x_r if r > s
    return jnp.where(i >= s, jnp.cumprod(factors, axis=-2), 0.0)


def _output_as_residual(f):
    """A custom-VJP forward rule for `f` whose backward needs only f's output."""

    def fwd(x):
        y = f(x)
        return y, y

    return fwd


def _segment_products_bwd(p, g):
    """dP[i, s]/dx_r = P[i, r] P[r-1, s] for s < r <= i (both factors vanish elsewhere), so
    dx_r = sum_i P[i, r] (G P'^T)[i, r], P' = P shifted down one row: no division by x."""
    return (jnp.sum(p * _mm_hi(g, jnp.swapaxes(_shift(p, 0.0, -2), -1, -2)), axis=-2),)


segment_products.defvjp(_output_as_residual(segment_products), _segment_products_bwd)


def _mm_hi(a, b):
    """Matmul at full float32 precision: the coefficient matrices compound products and inverses,
    which the default TPU precision (bf16 passes) would round at 1e-3."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def unit_lower_inverse(t: jax.Array) -> jax.Array:
    """Inverse of unit lower-triangular matrices [..., n, n] by bottom-up block recursion.

    Doubles the solved diagonal blocks each level: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]].
    Only batched matmuls (log2 n levels), at full float32 precision. Chosen over jax's triangular
    solve because on CPU that calls a threaded BLAS which stalled inside XLA's executor here.
    """
    n = t.shape[-1]
    size = 1 << max(n - 1, 0).bit_length()  # pad to a power of two with identity
    if size != n:
        pad = [(0, 0)] * (t.ndim - 2) + [(0, size - n), (0, size - n)]
        t = jnp.pad(t, pad) + jnp.diag(jnp.arange(size) >= n).astype(t.dtype)
    lead = t.shape[:-2]
    inv = jnp.ones((*lead, size, 1, 1), t.dtype)  # inverses of the 1 x 1 diagonal blocks
    s = 1
    while s < size:
        nb = size // (2 * s)
        blocks = t.reshape(*lead, nb, 2 * s, nb, 2 * s)
        blocks = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [..., nb, 2s, 2s]
        pairs = inv.reshape(*lead, nb, 2, s, s)
        a_inv, d_inv = pairs[..., 0, :, :], pairs[..., 1, :, :]
        lower = -_mm_hi(_mm_hi(d_inv, blocks[..., s:, :s]), a_inv)
        top = jnp.concatenate([a_inv, jnp.zeros_like(a_inv)], axis=-1)
        inv = jnp.concatenate([top, jnp.concatenate([lower, d_inv], axis=-1)], axis=-2)
        s *= 2
    return inv.reshape(*lead, size, size)[..., :n, :n]


def _unit_lower_inverse_bwd(inv, g):
    """d(T^-1) = -T^-1 dT T^-1; only the strictly lower entries of T are read (the diagonal is 1)."""
    inv_t = jnp.swapaxes(inv, -1, -2)
    n = inv.shape[-1]
    return (jnp.where(jnp.tri(n, k=-1, dtype=bool), -_mm_hi(_mm_hi(inv_t, g), inv_t), 0.0),)


unit_lower_inverse.defvjp(_output_as_residual(unit_lower_inverse), _unit_lower_inverse_bwd)


def _shift(x: jax.Array, fill: float, axis: int) -> jax.Array:
    """Entry i along `axis` becomes entry i-1 (the state before token i); entry 0 is `fill`."""
    first = jnp.full_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis), fill)
    return jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, x.shape[axis] - 1, axis=axis)], axis=axis)


class _Coefs(NamedTuple):
    A: jax.Array  # [B, H, C, C] retention products
    a: jax.Array  # [B, H, C]    prefix retention
    Cm: jax.Array  # [B, H, C, C] coefficient of each token's gradient in W_i
    mu: jax.Array | None  # [B, H, C] coefficient of S_0 in W_i
    Bm: jax.Array | None  # [B, H, C, C] momentum products
    b: jax.Array | None  # [B, H, C]


def _coefs(rates: update_rule.Rates) -> tuple[_Coefs, _Coefs]:
    """Coefficients for W_i (post-update) and for W_{i-1} (before token i), in float32."""
    f32 = lambda r: r.astype(jnp.float32)  # noqa: E731  (bf16 rates would round the products)
    alpha = f32(rates.retention) if rates.retention is not None else jnp.ones(rates.lr.shape, jnp.float32)
    A = segment_products(alpha)
    a = A[..., :, 0] * alpha[..., :1]
    if rates.momentum is None:
        Cm, mu, Bm, b = A, None, None, None
    else:
        beta = f32(rates.momentum)
        Bm = segment_products(beta)
        b = Bm[..., :, 0] * beta[..., :1]
        Cm = _mm_hi(A, Bm)
        mu = _mm_hi(A, b[..., None])[..., 0]
    post = _Coefs(A, a, Cm, mu, Bm, b)
    # Only the final state uses Bm and b, and only from `post`.
    pre = _Coefs(
        _shift(A, 0.0, -2),
        _shift(a, 1.0, -1),
        _shift(Cm, 0.0, -2),
        None if mu is None else _shift(mu, 0.0, -1),
        None,
        None,
    )
    return post, pre


class _Track(NamedTuple):
    """The within-chunk trajectory of one weight matrix, in closed form."""

    w0: jax.Array  # [B, H, O, I]
    s0: jax.Array | None  # momentum at the boundary
    x: jax.Array  # [B, H, C, I] inputs of this matrix at the boundary state
    ue: jax.Array  # [B, H, C, O] eta_s * e_s
    gp: jax.Array | None  # [B, H, C, O] gamma_s * p_s (DGD), with p_s = W_{s-1} k_s


def _boundary_terms(co: _Coefs, tr: _Track, qr: jax.Array, qw0: jax.Array | None = None) -> jax.Array:
    """a_i W_0 q_i + mu_i S_0 q_i; `qw0` = W_0 q_i when the caller has it already."""
    y = co.a[..., None] * (st.matmul_t(qr, tr.w0) if qw0 is None else qw0)
    if tr.s0 is not None:
        y = y + co.mu[..., None] * st.matmul_t(qr, tr.s0)
    return y


def _dgd_predictions(co: _Coefs, tr: _Track, kw0, gamma):
    """Solve for p_i = W_{i-1} k_i of the input-side weight (see module docstring); kw0 = K W_0^T."""
    k = tr.x
    gram = jnp.einsum("...ti,...si->...ts", k, k)
    rhs = _boundary_terms(co, tr, k, kw0) - (co.Cm * gram) @ tr.ue
    lower = (co.A * gram) * gamma[..., None, :]
    eye = jnp.eye(k.shape[-2], dtype=lower.dtype)
    return unit_lower_inverse(eye + lower) @ rhs


def _read_parts(co: _Coefs, tr: _Track, qr: jax.Array, qw0: jax.Array | None = None):
    """W_i q_i (post coefficients) or W_{i-1} q_i (pre coefficients) for queries qr [B, H, C, I],
    as (the terms of the block's starting state, the sum of the block's updates)."""
    qx = jnp.einsum("...ti,...si->...ts", qr, tr.x)
    delta = -((co.Cm * qx) @ tr.ue)
    if tr.gp is not None:  # the DGD weight's inputs are the keys
        delta = delta - (co.A * qx) @ tr.gp
    return _boundary_terms(co, tr, qr, qw0), delta


def _read(co: _Coefs, tr: _Track, qr: jax.Array) -> jax.Array:
    """W_i q_i (post coefficients) or W_{i-1} q_i (pre coefficients) for queries qr [B, H, C, I]."""
    base, delta = _read_parts(co, tr, qr)
    return base + delta


def _scaled_read(co: _Coefs, tr: _Track, qr, w_b, tau, from_boundary: bool):
    """W_B q + tau (W q - W_B q): the read with a delta scale tau [B, H, C] (W_B = w_b, the boundary)."""
    qw0 = st.matmul_t(qr, tr.w0)
    base, delta = _read_parts(co, tr, qr, qw0)
    qb = qw0 if from_boundary else st.matmul_t(qr, w_b)
    # (base - qb) is exactly 0 from the boundary without retention, so tau scales the updates alone
    return qb + tau[..., None].astype(qb.dtype) * ((base - qb) + delta)


def _final(co: _Coefs, tr: _Track, last):
    """W and S after token `last` of the block (an int, possibly traced)."""
    scaled = co.Cm[..., last, :, None] * tr.ue
    if tr.gp is not None:  # the DGD weight's inputs are the keys, so both sums share one product
        scaled = scaled + co.A[..., last, :, None] * tr.gp
    w = co.a[..., last, None, None] * tr.w0 - jnp.einsum("...so,...si->...oi", scaled, tr.x)
    if tr.s0 is None:
        return w.astype(tr.w0.dtype), None  # the state keeps its dtype
    w = w + co.mu[..., last, None, None] * tr.s0
    s = co.b[..., last, None, None] * tr.s0 - jnp.einsum(
        "...s,...so,...si->...oi", co.Bm[..., last, :], tr.ue, tr.x
    )
    return w.astype(tr.w0.dtype), s.astype(tr.s0.dtype)


def chunk_update(
    spec: st.MemorySpec,
    read: str | None,
    weights,
    momentum,
    boundary,
    q,
    k,
    v,
    rates: update_rule.Rates,
    last=-1,
    *,
    norm: st.InnerNorm | None = None,
    close=False,
):
    """A block of tokens that all lie in one chunk, in chunk layout: q, k [B, H, C, Dk], v [B, H, C, Dv],
    rates [B, H, C]; their leading axes broadcast against the state's (memories stacked ahead of B
    that share their inputs pass those with a unit leading axis).

    Starts from the running state (`weights`, `momentum`), which may be partway into the chunk, and
    takes every gradient (and self-generated target) at `boundary`, the state at the chunk's start.
    Returns (y [B, H, C, Dv], or None when `read` is None; weights; momentum), the state after token
    `last` (an int, possibly traced). Rows after `last` do not affect rows up to it (causality), so a
    caller may pad or wrap the block beyond `last`. `norm`: the inner LayerNorm of a `norm` memory.
    `close` (a bool, possibly traced): token `last` ends the chunk, so with a `delta_scale` the
    returned weights are the scaled state handed to the next chunk.
    """
    post, pre = _coefs(rates)
    fac = st.token_errors(spec, boundary, k, st.targets(spec, boundary, v, norm), norm)
    tracks = {}
    for name in weights._fields:
        w0 = getattr(weights, name)
        s0 = None if momentum is None else getattr(momentum, name)
        x = getattr(fac.inputs, name)
        ue = rates.lr[..., None] * getattr(fac.errors, name)
        tr = _Track(w0, s0, x, ue, None)
        if rates.dgd is not None and name == st.input_side(spec):
            # the DGD erase acts on the running state: its key predictions start from w0, not the boundary
            kw0 = fac.key_proj if weights is boundary else st.matmul_t(k, w0)
            tr = tr._replace(gp=rates.dgd[..., None] * _dgd_predictions(pre, tr, kw0, rates.dgd))
        tracks[name] = tr

    tau = rates.delta_scale
    if read is None:
        y = None
    elif read == "boundary":
        y = st.apply(spec, boundary, q, norm)
    else:
        co = pre if read == "per_token" else post
        if tau is None:
            products = lambda name, x: _read(co, tracks[name], x)  # noqa: E731
        else:
            products = lambda name, x: _scaled_read(  # noqa: E731
                co, tracks[name], x, getattr(boundary, name), tau, weights is boundary
            )
        y = st.forward(spec, products, q, norm)

    finals = {name: _final(post, tr, last) for name, tr in tracks.items()}
    new_w = type(weights)(**{n: f[0] for n, f in finals.items()})
    new_s = None if momentum is None else type(momentum)(**{n: f[1] for n, f in finals.items()})
    if tau is not None and close is not False:
        new_w = _select(close, update_rule.scaled_weights(boundary, new_w, tau[..., last]), new_w)
    return y, new_w, new_s


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


def _select(pred, a, b):
    """jnp.where over pytrees; a python bool picks statically."""
    if isinstance(pred, bool):
        return a if pred else b
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


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


def _advance_block(block_fn, states, step, xs, chunk_size: int, n: int):
    """n <= chunk_size tokens from `step` tokens into a chunk: they cross at most one chunk boundary.

    Pass 1 runs the block from the current boundary and stops at the boundary (token p - 1, with
    p = chunk_size - step) or at the block's end. If the boundary falls inside the block, pass 2
    runs the remaining tokens, rotated to the front, from the new boundary. Both passes are the
    closed form of `chunk_update`; pass 2 only runs when needed (`lax.cond`).
    """
    static = isinstance(step, int)
    p = chunk_size - step
    new_step = (step + n) % chunk_size
    step_arr = lambda s: jnp.asarray(s, jnp.int32)  # noqa: E731
    ys1, upd = block_fn(states, xs, min(p, n) - 1 if static else jnp.minimum(p, n) - 1)
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
    if n == 1:  # one token never passes a boundary before its own end
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
    """
    t = jax.tree.leaves(xs)[0].shape[1]
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
    carry, ys = jax.lax.scan(body, carry, xs)
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
    (weights, momentum), ys = jax.lax.scan(body, (state.weights, state.momentum), xs)
    return from_chunks(ys), st.MemoryState(weights, momentum, weights, jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size", "read", "remat"))
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
):
    """Streaming form: any number of tokens from any position inside a chunk, same shapes as
    `memory_chunked`; equal to `memory_naive` with the same chunk size.

    Closed forms throughout (no per-token loop): a block of up to `chunk_size` tokens crosses at
    most one chunk boundary and costs one or two chunk passes, so a call costs at most twice the
    chunked form. Segments shorter than a chunk (a model run in segments, prefill, a decode step)
    continue exactly where the last call stopped.
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

    y, states = stream_blocks(block_fn, {"m": state}, state.step, (q, k, v, rates), chunk_size, remat=remat)
    return y, states["m"]
