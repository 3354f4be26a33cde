"""One chunk of the sequential part of the chunked form, as pure functions of values: what the
Pallas kernels (`pallas_chunked`) run per chunk, for the linear and the MLP memory.

Per memory structure two functions, all per (batch, head) and chunk of C tokens, float32:

  <structure>_operands   XLA, all chunks at once: everything of `closed_form.chunk_update` that does not
                         depend on the running state (retention and momentum products, the DGD
                         unit lower-triangular inverse, the read masks where the state does not
                         enter them), from q, k, v [..., C, D] and rates [..., C]
  <structure>_forward    (y [C, Dv], state after the chunk) from the state at its start: (W,) or
                         (W, S) for the linear memory, (W1, W2) or (W1, W2, S1, S2) for the MLP

The backward of a step is its VJP by autodiff (`vjp_step`), traced inside the backward kernel:
(d state at the start, d operands) from dy and d(state after).

Linear memory. Every quantity of the chunk is linear in its starting state, so per chunk

  U  = Ne (K W^T) + Re                    eta_s e_s, the per-token gradient factors      [C, Dv]
  G  = Nw (K W^T) + Ns (K S^T) + Rg       gamma_s p_s, the DGD factors (momentum and DGD only)
  Y  = Qa W^T + Qm S^T - Aq U - Ag G      the reads
  W' = a W + mu S - U^T Kd - G^T Kg       the state after the chunk
  S' = b S - U^T Kb

with the C x C matrices Ne, Nw, Ns, Aq, Ag, the [C, D] matrices Re, Rg, Qa, Qm, Kd, Kg, Kb and the
scalars a, mu, b from `linear_operands`. Without momentum (Cm = A in `chunked`) the DGD factors
share U's coefficients, so G folds into U and S, Qm, Ns, Ag, Kg, Kb, mu, b are absent (None).

MLP memory, M(z) = z + W1 s(W2 z). The chunk's gradients are taken at its starting state, so its
factors (the hidden activations of the keys, the output and hidden errors) are functions of that
state: `mlp_forward` computes them in the kernel, then the closed forms of `chunked` (the DGD
predictions with the precomputed inverse, the two tracks' reads, the final weights and momenta)
with the coefficient matrices of `mlp_operands`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nl_jax.memory.ops import update_rule
from nl_jax.memory.ops import structures as st
from nl_jax.memory.ops.closed_form import _coefs, unit_lower_inverse

_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a, b, contract):
    """a [.., .] x b [.., .] over the given (lhs, rhs) dimensions, full float32."""
    return jax.lax.dot_general(
        a, b, ((contract[:1], contract[1:]), ((), ())), precision=_HIGHEST, preferred_element_type=jnp.float32
    )


def _mm(a, b):  # a b
    return _dot(a, b, (1, 0))


def _mm_t(a, b):  # a b^T
    return _dot(a, b, (1, 1))


def _t_mm(a, b):  # a^T b
    return _dot(a, b, (0, 0))


# ---------------------------------------------------------------------------------------------
# The linear memory


class LinearOperands(NamedTuple):
    """The linear memory's per-chunk operands [..., C, *] (module docstring); the fields of momentum
    (and of DGD with momentum) are None without it, the read's masks None for `boundary`."""

    qa: jax.Array  # [BH, N, C, Dk] queries scaled by the read's prefix retention
    k: jax.Array  # [BH, N, C, Dk]
    ne: jax.Array  # [BH, N, C, C]  U's dependence on K W^T
    re: jax.Array  # [BH, N, C, Dv] U's part that does not depend on the state
    kd: jax.Array  # [BH, N, C, Dk] keys scaled by U's coefficient in the chunk's last state
    a: jax.Array  # [BH, N, 1, 1]  retention over the whole chunk
    aq: jax.Array | None  # [BH, N, C, C] the read's masked Q K^T against U
    qm: jax.Array | None = None  # [BH, N, C, Dk] queries scaled by the read's momentum coefficient
    mu: jax.Array | None = None  # [BH, N, 1, 1] S's coefficient in the chunk's last W
    b: jax.Array | None = None  # [BH, N, 1, 1] momentum decay over the whole chunk
    kb: jax.Array | None = None  # [BH, N, C, Dk] keys scaled by U's coefficient in the last S
    nw: jax.Array | None = None  # [BH, N, C, C] G's dependence on K W^T
    ns: jax.Array | None = None  # [BH, N, C, C] G's dependence on K S^T
    rg: jax.Array | None = None  # [BH, N, C, Dv]
    ag: jax.Array | None = None  # [BH, N, C, C] the read's masked Q K^T against G
    kg: jax.Array | None = None  # [BH, N, C, Dk]


def linear_operands(spec: st.MemorySpec, q, k, v, rates: update_rule.Rates, read: str) -> LinearOperands:
    """The state-independent matrices of every chunk (inputs [..., C, D], rates [..., C]).

    From `closed_form.chunk_update` with W_0 = W, S_0 = S: U = eta E with the errors
    E = lam (K W^T) - V (lam = 1 for l2, 0 for dot), and the DGD predictions
    P = T^-1 (a' (K W^T) + mu' (K S^T) - (Cm' * K K^T) U) with T = I + (A' * K K^T) diag(gamma),
    G = gamma P (primes: the coefficients of the state before each token).
    """
    post, pre = _coefs(rates)
    eta = rates.lr
    lam = eta if spec.objective == "l2" else jnp.zeros_like(eta)
    eye = jnp.eye(k.shape[-2], dtype=k.dtype)
    mm = functools.partial(jnp.matmul, precision=_HIGHEST)
    ne = lam[..., :, None] * eye
    re = -eta[..., None] * v
    momentum = rates.momentum is not None
    nw = ns = rg = None
    if rates.dgd is not None:
        gamma = rates.dgd[..., :, None]
        gram = jnp.einsum("...ti,...si->...ts", k, k, precision=_HIGHEST)
        t_inv = unit_lower_inverse(eye + (pre.A * gram) * rates.dgd[..., None, :])
        cg = pre.Cm * gram  # (Cm' * K K^T)
        nw = gamma * mm(t_inv, pre.a[..., :, None] * eye - cg * lam[..., None, :])
        rg = gamma * mm(t_inv, mm(cg, eta[..., None] * v))
        if momentum:
            ns = gamma * (t_inv * pre.mu[..., None, :])
        else:  # U and G share their coefficients: fold G into U
            ne, re, nw, rg = ne + nw, re + rg, None, None
    ops = dict(k=k, ne=ne, re=re, kd=post.Cm[..., -1, :, None] * k, a=post.a[..., -1, None, None])
    if momentum:
        last = lambda x: x[..., -1, None, None]  # noqa: E731  (a coefficient over the whole chunk)
        ops.update(mu=last(post.mu), b=last(post.b), kb=post.Bm[..., -1, :, None] * k)
        if nw is not None:
            ops.update(nw=nw, ns=ns, rg=rg, kg=post.A[..., -1, :, None] * k)
    if read == "boundary":
        return LinearOperands(qa=q, aq=None, **ops)
    co = pre if read == "per_token" else post
    qk = jnp.einsum("...ti,...si->...ts", q, k, precision=_HIGHEST)
    ops.update(qa=co.a[..., None] * q, aq=co.Cm * qk)
    if momentum:
        ops.update(qm=co.mu[..., None] * q)
        if nw is not None:
            ops.update(ag=co.A * qk)
    return LinearOperands(**ops)


def linear_forward(spec: st.MemorySpec, state, o: LinearOperands):
    """(Y [C, Dv], state after the chunk) of one chunk from its starting state (W,) or (W, S)."""
    w, s = state if len(state) == 2 else (state[0], None)
    kw = _mm_t(o.k, w)
    u = _mm(o.ne, kw) + o.re
    y = _mm_t(o.qa, w)
    if o.aq is not None:
        y = y - _mm(o.aq, u)
    w_next = o.a * w - _t_mm(u, o.kd)
    if s is None:
        return y, (w_next,)
    if o.qm is not None:
        y = y + _mm_t(o.qm, s)
    w_next = w_next + o.mu * s
    s_next = o.b * s - _t_mm(u, o.kb)
    if o.nw is not None:
        g = _mm(o.nw, kw) + _mm(o.ns, _mm_t(o.k, s)) + o.rg
        if o.ag is not None:
            y = y - _mm(o.ag, g)
        w_next = w_next - _t_mm(g, o.kg)
    return y, (w_next, s_next)


# ---------------------------------------------------------------------------------------------
# The MLP memory


class MLPOperands(NamedTuple):
    """The MLP memory's per-chunk operands [..., C, *] (columns [..., C, 1], scalars [..., 1, 1]):
    the inputs, and the coefficients of `closed_form._coefs` that its closed forms apply. Fields of
    momentum, DGD and the per-token reads are None where the call has none of them."""

    q: jax.Array  # [C, D]
    k: jax.Array  # [C, D]
    v: jax.Array  # [C, D]
    eta: jax.Array  # [C, 1] inner learning rates
    fa: jax.Array  # [1, 1] retention over the whole chunk
    fcm: jax.Array  # [C, 1] each token's gradient coefficient in the chunk's last weights (Cm[-1])
    fmu: jax.Array | None = None  # [1, 1] S's coefficient in the last weights
    fb: jax.Array | None = None  # [1, 1] momentum decay over the chunk
    fbm: jax.Array | None = None  # [C, 1] each token's coefficient in the last momentum (Bm[-1])
    t_inv: jax.Array | None = None  # [C, C] DGD: (I + (A' * K K^T) diag(gamma))^-1
    cg: jax.Array | None = None  # [C, C] DGD: Cm' * K K^T
    pa: jax.Array | None = None  # [C, 1] DGD: prefix retention before each token
    pmu: jax.Array | None = None  # [C, 1] DGD with momentum: S's coefficient before each token
    gamma: jax.Array | None = None  # [C, 1] DGD rates
    fA: jax.Array | None = None  # [C, 1] DGD: each token's retention to the chunk's end (A[-1])
    ra: jax.Array | None = None  # [C, 1] the read's prefix retention
    rcm: jax.Array | None = None  # [C, C] the read's gradient coefficients (Cm or Cm')
    mq: jax.Array | None = None  # [C, C] the read's mask of the hidden track: rcm * Q K^T
    rmu: jax.Array | None = None  # [C, 1] the read's momentum coefficient
    mqg: jax.Array | None = None  # [C, C] DGD: the read's retention-masked Q K^T (A * Q K^T)


def mlp_operands(spec: st.MemorySpec, q, k, v, rates: update_rule.Rates, read: str) -> MLPOperands:
    """The state-independent coefficients of every chunk (inputs [..., C, D], rates [..., C])."""
    post, pre = _coefs(rates)
    col = lambda x: x[..., :, None]  # noqa: E731  [..., C] -> [..., C, 1]
    last = lambda x: x[..., -1, None, None]  # noqa: E731  (a coefficient over the whole chunk)
    ops = dict(q=q, k=k, v=v, eta=col(rates.lr), fa=last(post.a), fcm=col(post.Cm[..., -1, :]))
    momentum = rates.momentum is not None
    if momentum:
        ops.update(fmu=last(post.mu), fb=last(post.b), fbm=col(post.Bm[..., -1, :]))
    if rates.dgd is not None:
        gram = jnp.einsum("...ti,...si->...ts", k, k, precision=_HIGHEST)
        eye = jnp.eye(k.shape[-2], dtype=k.dtype)
        t_inv = unit_lower_inverse(eye + (pre.A * gram) * rates.dgd[..., None, :])
        ops.update(t_inv=t_inv, cg=pre.Cm * gram, pa=col(pre.a), gamma=col(rates.dgd))
        ops.update(fA=col(post.A[..., -1, :]))
        if momentum:
            ops.update(pmu=col(pre.mu))
    if read != "boundary":
        co = pre if read == "per_token" else post
        qk = jnp.einsum("...ti,...si->...ts", q, k, precision=_HIGHEST)
        ops.update(ra=col(co.a), rcm=co.Cm, mq=co.Cm * qk)
        if momentum:
            ops.update(rmu=col(co.mu))
        if rates.dgd is not None:
            ops.update(mqg=co.A * qk)
    return MLPOperands(**ops)


def mlp_forward(spec: st.MemorySpec, state, o: MLPOperands):
    """(Y [C, D], state after the chunk) of one chunk from its starting state (W1, W2[, S1, S2])."""
    w1, w2 = state[:2]
    s1, s2 = state[2:] if len(state) == 4 else (None, None)
    hk = _mm_t(o.k, w2)  # the keys' hidden pre-activations at the chunk's start, [C, Dh]
    ak, dak = jax.jvp(spec.act, (hk,), (jnp.ones_like(hk),))
    e1 = o.k + _mm_t(ak, w1) - o.v if spec.objective == "l2" else -o.v  # output errors
    ue1 = o.eta * e1  # the output-side track: inputs ak
    ue2 = o.eta * (_mm(e1, w1) * dak)  # the input-side track: inputs k
    gp = None
    if o.t_inv is not None:  # DGD predictions of the input-side weight, p_i = W2_{i-1} k_i
        rhs = o.pa * hk - _mm(o.cg, ue2)
        if s2 is not None:
            rhs = rhs + o.pmu * _mm_t(o.k, s2)
        gp = o.gamma * _mm(o.t_inv, rhs)
    if o.ra is None:  # boundary reads
        y = o.q + _mm_t(spec.act(_mm_t(o.q, w2)), w1)
    else:
        zq = o.ra * _mm_t(o.q, w2) - _mm(o.mq, ue2)
        if s2 is not None:
            zq = zq + o.rmu * _mm_t(o.q, s2)
        if gp is not None:
            zq = zq - _mm(o.mqg, gp)
        hq = spec.act(zq)
        y = o.q + o.ra * _mm_t(hq, w1) - _mm(o.rcm * _mm_t(hq, ak), ue1)
        if s1 is not None:
            y = y + o.rmu * _mm_t(hq, s1)
    w1_next = o.fa * w1 - _t_mm(ue1, o.fcm * ak)
    w2_next = o.fa * w2 - _t_mm(ue2, o.fcm * o.k)
    if gp is not None:
        w2_next = w2_next - _t_mm(gp, o.fA * o.k)
    if s1 is None:
        return y, (w1_next, w2_next)
    w1_next, w2_next = w1_next + o.fmu * s1, w2_next + o.fmu * s2
    s1_next = o.fb * s1 - _t_mm(ue1, o.fbm * ak)
    s2_next = o.fb * s2 - _t_mm(ue2, o.fbm * o.k)
    return y, (w1_next, w2_next, s1_next, s2_next)


# ---------------------------------------------------------------------------------------------
# By structure


def vjp_step(forward):
    """The backward of a chunk step: its VJP by autodiff, recomputing the chunk from its starting
    state, (d state at the start, d operands) from dy and d(state after)."""

    def backward(spec: st.MemorySpec, state, dstate_next, dy, o):
        _, vjp = jax.vjp(functools.partial(forward, spec), state, o)
        return vjp((dy, tuple(dstate_next)))

    return backward


STEPS = {
    "linear": (linear_operands, linear_forward, vjp_step(linear_forward)),
    "mlp": (mlp_operands, mlp_forward, vjp_step(mlp_forward)),
}
