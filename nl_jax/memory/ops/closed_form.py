"""The closed form of one chunk of the chunked memory form: the coefficient matrices, the DGD solve,
the reads and the final state of a block of tokens inside one chunk (`chunk_update`).

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
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nl_jax.memory.ops import structures as st
from nl_jax.memory.ops import update_rule


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


def _select(pred, a, b):
    """jnp.where over pytrees; a python bool picks statically."""
    if isinstance(pred, bool):
        return a if pred else b
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)
