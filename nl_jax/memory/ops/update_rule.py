"""The inner update rule shared by all forms, and the one-token decode step (`memory_recurrent`).

For each token t, with B(t) the state at the last chunk boundary (docs/design.md, Decision 6):

  g_t = dL(M_{B(t)}; k_t, v_t)/dW                       gradient at the boundary state
  S_t = beta_t S_{t-1} - eta_t g_t                      momentum (surprise); S_t = -eta_t g_t without it
  W_t = alpha_t W_{t-1} - gamma_t (W_{t-1} k_t) k_t^T + S_t    DGD term on the input-side weight only
  W_t = alpha_t W_{t-1} + S_t                           every other weight

eta is the inner learning rate, alpha the retention gate (weight decay: 1 keeps everything), beta the
momentum decay and gamma the DGD rate (Eq. 55-57, 86-88; the paper uses gamma = eta). Each is a
per-token, per-head scalar. Leaving `retention`, `momentum` or `dgd` out switches that part off.

Vector gates (the generalised delta rule of RWKV-7, "Goose", arXiv 2503.14456), linear memory only:

  W_t = W_{t-1} diag(alpha_t) - gamma_t (W_{t-1} c_t) d_t^T + S_t

`retention` may be a vector per token and head ([B, T, H, Dk]: a decay per key channel, acting on
the input side), and the DGD term may read the state at `erase_key` c_t and remove along
`erase_dir` d_t ([B, T, H, Dk] each) instead of c_t = d_t = k_t. Its chunked form is `vector_chunked`.

`delta_scale` tau_t (optional) scales what token t sees of its chunk's updates: it reads with
W_B + tau_t (W_read - W_B) instead of W_read, and the last token of a chunk hands on
W_B + tau_t (W_t - W_B) as the next boundary state (momentum is not scaled). TTT's `token_idx`
(Sun et al. 2024): with tau_t = 1/(position in the mini-batch + 1), token t reads the mean of the
gradient steps of its mini-batch so far, and the state carried on is the mini-batch mean.

Reads (`read=`):
  boundary     y_t = M_{B(t)}(q_t)     the paper's Eq. 90, read with the state before the chunk
  per_token    y_t = M_{t-1}(q_t)      sees the updates of the earlier tokens of its chunk
  post_update  y_t = M_t(q_t)          also sees its own update (DeltaNet, TTT, Titans convention)
With chunk size 1, `boundary` and `per_token` coincide.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nl_jax.memory.ops import structures as st

READ_MODES = ("boundary", "per_token", "post_update")


class Rates(NamedTuple):
    """Per-token, per-head rates: [B, T, H] for a sequence, [B, H] for one decode step."""

    lr: jax.Array
    retention: jax.Array | None = None
    momentum: jax.Array | None = None
    dgd: jax.Array | None = None
    delta_scale: jax.Array | None = None
    erase_key: jax.Array | None = None  # c_t of the DGD term [.., Dk] (None: the key)
    erase_dir: jax.Array | None = None  # d_t of the DGD term [.., Dk] (None: the key)


def has_vector_gates(rates: Rates) -> bool:
    """Whether the call uses a per-channel retention or a two-vector DGD term (module docstring)."""
    vector_retention = rates.retention is not None and rates.retention.ndim > rates.lr.ndim
    return vector_retention or rates.erase_key is not None or rates.erase_dir is not None


def check_call(
    spec: st.MemorySpec, state: st.MemoryState, rates: Rates, read: str, chunk_size: int, norm=None
) -> None:
    st.check_weights(spec, state.weights)
    st.check_norm(spec, norm)
    if read not in READ_MODES:
        raise ValueError(f"read must be one of {READ_MODES}, got {read!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if has_vector_gates(rates):
        if spec.structure != "linear" or spec.bias:
            raise ValueError("vector retention and erase_key / erase_dir need the linear memory without bias")
        if (rates.erase_key is not None or rates.erase_dir is not None) and rates.dgd is None:
            raise ValueError("erase_key / erase_dir shape the DGD term: they need rates.dgd")
    if (rates.momentum is None) != (state.momentum is None):
        raise ValueError(
            "rates.momentum and state.momentum must both be given or both be None "
            "(build the state with init_state(weights, momentum=...))"
        )


def _bcast(r, w):
    """A [..] rate against a [.., O, I] weight."""
    return r[..., None, None].astype(w.dtype)


def apply_update(spec: st.MemorySpec, weights, momentum, grads, k, rates: Rates):
    """One token's update from full gradients `grads` (pytree like weights). Returns (weights, momentum)."""
    u = jax.tree.map(lambda g: -_bcast(rates.lr, g) * g, grads)
    if rates.momentum is not None:
        u = jax.tree.map(lambda s, x: _bcast(rates.momentum, s) * s + x, momentum, u)
        momentum = jax.tree.map(lambda s, x: x.astype(s.dtype), momentum, u)
    new = {}
    for name, w in weights._asdict().items():
        if rates.retention is None:
            w_new = w
        elif rates.retention.ndim > rates.lr.ndim:  # a decay per input channel: W diag(alpha)
            w_new = w * rates.retention[..., None, :].astype(w.dtype)
        else:
            w_new = _bcast(rates.retention, w) * w
        if rates.dgd is not None and name == st.input_side(spec):
            c = k if rates.erase_key is None else rates.erase_key
            d = k if rates.erase_dir is None else rates.erase_dir
            wc = jnp.einsum("...oi,...i->...o", w, c)
            w_new = w_new - _bcast(rates.dgd, w) * jnp.einsum("...o,...i->...oi", wc, d)
        new[name] = (w_new + getattr(u, name)).astype(w.dtype)  # the state keeps its dtype
    return type(weights)(**new), momentum


def scaled_weights(boundary, weights, tau):
    """W_B + tau (W - W_B) for each weight matrix (see `delta_scale`); tau [..]."""
    return jax.tree.map(lambda b, w: (b + _bcast(tau, w) * (w - b)).astype(w.dtype), boundary, weights)


def advance(state: st.MemoryState, weights, momentum, chunk_size: int, delta_scale=None) -> st.MemoryState:
    """Count one token; at the end of a chunk the new weights (scaled by `delta_scale` when given)
    become the boundary state."""
    step = state.step + 1
    at_boundary = step >= chunk_size
    if delta_scale is not None:
        closed = scaled_weights(state.boundary, weights, delta_scale)
        weights = jax.tree.map(lambda c, w: jnp.where(at_boundary, c, w), closed, weights)
    boundary = jax.tree.map(lambda w, b: jnp.where(at_boundary, w, b), weights, state.boundary)
    return st.MemoryState(weights, momentum, boundary, jnp.where(at_boundary, 0, step).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size", "read"))
def memory_recurrent(
    spec: st.MemorySpec,
    state: st.MemoryState,
    q,
    k,
    v,
    rates: Rates,
    *,
    chunk_size: int = 1,
    read: str = "per_token",
    norm: st.InnerNorm | None = None,
):
    """One token: q, k [B, H, Dk], v [B, H, Dv], rates [B, H]. Returns (y [B, H, Dv], new state).

    Uses the closed-form rank-one gradient factors (`structures.token_errors`), so a decode step costs
    a few matrix-vector products per head. `norm`: the inner LayerNorm of a `norm` memory.
    """
    check_call(spec, state, rates, read, chunk_size, norm)
    one = lambda x: x[..., None, :]  # noqa: E731  (token axis of length one)

    def read_with(weights):
        if rates.delta_scale is not None and read != "boundary":
            weights = scaled_weights(state.boundary, weights, rates.delta_scale)
        return st.apply(spec, weights, one(q), norm)[..., 0, :]

    if read != "post_update":
        y = read_with(state.boundary if read == "boundary" else state.weights)
    target = st.targets(spec, state.boundary, one(v), norm)
    fac = st.token_errors(spec, state.boundary, one(k), target, norm)
    grads = jax.tree.map(lambda e, x: jnp.einsum("...co,...ci->...oi", e, x), fac.errors, fac.inputs)
    weights, momentum = apply_update(spec, state.weights, state.momentum, grads, k, rates)
    if read == "post_update":
        y = read_with(weights)
    return y, advance(state, weights, momentum, chunk_size, rates.delta_scale)


def memory_recurrent_scan(
    spec: st.MemorySpec,
    state: st.MemoryState,
    q,
    k,
    v,
    rates: Rates,
    *,
    chunk_size: int = 1,
    read: str = "per_token",
    norm: st.InnerNorm | None = None,
):
    """`memory_recurrent` over every token of q, k [B, T, H, Dk], v [B, T, H, Dv], rates [B, T, H]:
    (y [B, T, H, Dv], state after the last token), what decoding the sequence computes, in one scan."""

    def step(mem, xs):
        y, mem = memory_recurrent(spec, mem, *xs, chunk_size=chunk_size, read=read, norm=norm)
        return mem, y

    time_major = jax.tree.map(lambda z: jnp.moveaxis(z, 1, 0), (q, k, v, rates))
    state, ys = jax.lax.scan(step, state, time_major)
    return jnp.moveaxis(ys, 0, 1), state
