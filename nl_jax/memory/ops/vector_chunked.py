"""The chunked form of the linear memory with vector gates (`update_rule`: a decay per key channel and the
two-vector DGD term of the generalised delta rule, RWKV-7 "Goose", arXiv 2503.14456).

Per head, with W [Dv, Dk], for token i of a chunk that starts from W_0 (also the boundary state):

  W_i = W_{i-1} diag(alpha_i) - gamma_i p_i d_i^T - eta_i e_i k_i^T,     p_i = W_{i-1} c_i

with e_i the inner objective's error at the boundary state (`structures.token_errors`: -v_i for the
dot objective, W_0 k_i - v_i for l2), c_i / d_i the erase key and direction (the key by default)
and alpha_i a vector per key channel or a scalar per head (then G below is one [C, C] matrix, and the
channel-weighted products are plain products weighted by it, as in `chunked`). With
G[i, s] = prod_{s<r<=i} alpha_r (a vector, `segment_products` per channel) and
a_i = prod_{r<=i} alpha_r, unrolling gives

  W_i x = W_0 (a_i * x) - sum_{s<=i} gamma_s p_s <d_s * G[i,s], x> - sum_{s<=i} eta_s e_s <k_s * G[i,s], x>

The predictions p solve a unit lower-triangular system (the UT/WY trick of DeltaNet), with primes
for the state before token i (rows shifted down one):

  (I + M'(C, D) diag(gamma)) P = (a' * C) W_0^T - M'(C, K) (eta E),    M'(X, Y)[i, s] = <x_i * G'[i,s], y_s>

Reads are the same sums for the queries (`post_update`: unprimed, `per_token`: primed, `boundary`: W_0).

The channel decays enter through the [C, C, Dk] products G themselves rather than through the
factorisation x_i a_i, y_s / a_s of gated linear attention: dividing by a prefix product overflows
float32 once a chunk's decay passes ~1e-38 and is undefined at a decay of exactly 0 (a document
restart), while G is exact for any gates in [0, 1], in value and in gradient. The price is C times
the memory of the keys per chunk for G (use small chunks, or `remat`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nl_jax.memory.ops import update_rule
from nl_jax.memory.ops import structures as st
from nl_jax.memory.ops.chunked import from_chunks, to_chunks
from nl_jax.memory.ops.closed_form import _shift, segment_products, unit_lower_inverse


def unsupported(spec: st.MemorySpec, state: st.MemoryState, rates: update_rule.Rates, norm) -> list[str]:
    """What of this call the vector-gate chunked form does not cover (empty when it covers all)."""
    checks = {
        f"structure={spec.structure!r}": spec.structure != "linear",
        "bias=True": spec.bias,
        "norm=True": spec.norm or norm is not None,
        "self_target=True": spec.self_target,
        "momentum": rates.momentum is not None or state.momentum is not None,
        "delta_scale": rates.delta_scale is not None,
    }
    return [name for name, bad in checks.items() if bad]


def _mix(x, g, y):
    """M[i, s] = sum_j x[i, j] g[j, i, s] y[s, j]: x [.., C, K], y [.., C, K], and g [.., K, C, C] per
    channel or [.., C, C] shared by the channels (a scalar retention: then M = G * (x y^T))."""
    if g.ndim == x.ndim:
        return g * jnp.einsum("...ik,...sk->...is", x, y, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("...ij,...jis,...sj->...is", x, g, y, precision=jax.lax.Precision.HIGHEST)


def _chunk(spec: st.MemorySpec, read: str, w0, xs):
    """One chunk in chunk layout: q, k, c, d [B, H, C, Dk], v [B, H, C, Dv], rates [B, H, C] (vectors
    [B, H, C, Dk]). Returns (y [B, H, C, Dv], W after the chunk)."""
    q, k, v, rates = xs
    f32 = lambda r: r.astype(jnp.float32)  # noqa: E731
    alpha = rates.retention
    if alpha is None:
        alpha = jnp.ones(k.shape[:-1], jnp.float32)
    alpha = f32(alpha)
    if alpha.ndim == k.ndim:  # a decay per channel: G [B, H, Dk, C, C], prefixes a [B, H, C, Dk]
        g = segment_products(jnp.swapaxes(alpha, -1, -2))
        a = jnp.swapaxes(g[..., :, 0], -1, -2) * alpha[..., :1, :]
        g_last = jnp.swapaxes(g[..., -1, :], -1, -2)  # [B, H, C, Dk]: G[last, s]
    else:  # one decay per head: G [B, H, C, C], a [B, H, C, 1]
        g = segment_products(alpha)
        a = (g[..., :, 0] * alpha[..., :1])[..., None]
        g_last = g[..., -1, :, None]
    g_pre, a_pre = _shift(g, 0.0, -2), _shift(a, 1.0, -2)

    ue = f32(rates.lr)[..., None] * st.token_errors(spec, st.LinearWeights(w0), k, v).errors.w

    # With the erase direction d = k (erase_dir None) the d-weighted products are the k-weighted ones.
    erase_along_k = rates.erase_dir is None
    if rates.dgd is None:
        p_gamma = None
    else:
        c = k if rates.erase_key is None else f32(rates.erase_key)
        d = k if erase_along_k else f32(rates.erase_dir)
        gamma = f32(rates.dgd)
        m_ck = _mix(c, g_pre, k)
        m_cd = m_ck if erase_along_k else _mix(c, g_pre, d)
        lower = m_cd * gamma[..., None, :]
        eye = jnp.eye(k.shape[-2], dtype=lower.dtype)
        p = unit_lower_inverse(eye + lower) @ (st.matmul_t(a_pre * c, w0) - m_ck @ ue)
        p_gamma = gamma[..., None] * p

    if read == "boundary":
        y = st.matmul_t(q, w0)
    else:
        gg, aa = (g, a) if read == "post_update" else (g_pre, a_pre)
        m_qk = _mix(q, gg, k)
        y = st.matmul_t(aa * q, w0) - m_qk @ ue
        if p_gamma is not None:
            y = y - (m_qk if erase_along_k else _mix(q, gg, d)) @ p_gamma

    w = w0 * a[..., -1, None, :] - jnp.einsum("...so,...si->...oi", ue, k * g_last)
    if p_gamma is not None:
        w = w - jnp.einsum("...so,...si->...oi", p_gamma, d * g_last)
    return y, w.astype(w0.dtype)


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size", "read", "remat"))
def memory_chunked_vector(
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
    """`memory_chunked` for vector gates (module docstring); the same contract and shapes."""
    update_rule.check_call(spec, state, rates, read, chunk_size, norm)
    missing = unsupported(spec, state, rates, norm)
    if missing:
        raise ValueError(f"the chunked form with vector gates does not cover {', '.join(missing)}")
    t = q.shape[1]
    if t % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} does not divide the sequence length {t}")
    xs = jax.tree.map(lambda x: to_chunks(x, chunk_size), (q, k, v, rates))

    def body(w, x):
        y, w = _chunk(spec, read, w, x)
        return w, y

    if remat:
        body = jax.checkpoint(body)
    w, ys = jax.lax.scan(body, state.weights.w, xs)
    weights = st.LinearWeights(w)
    return from_chunks(ys), st.MemoryState(weights, None, weights, jnp.zeros((), jnp.int32))
