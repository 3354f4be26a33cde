"""Mamba selective state-space layer (Gu & Dao 2023, `mamba_simple.Mamba`), with its functional core.

    x, z = split(in_proj(u))                         [B, T, Din] each, Din = expand * d_model
    x = SiLU(conv(x) + conv_bias)                    causal depthwise conv, width d_conv
    dt, B, C = split(x_proj(x))                      [R], [N], [N] per token (R = dt_rank)
    dt = softplus(dt W_dt + b_dt)                    [Din] per token
    A = -exp(A_log)                                  [Din, N], input independent
    h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t     [Din, N] state per sequence
    y_t = h_t C_t + D * x_t
    out = out_proj(y * SiLU(z))

The scan has three forms with one contract, `f(x, dt, A, B, C, D, h0) -> (y, h_T)` in float32:

  selective_scan_step      one token (the decode step)
  selective_scan_naive     `lax.scan` of the step over tokens: the readable reference
  selective_scan_chunked   the training form: `lax.scan` over chunks, `lax.associative_scan`
                           over the tokens of a chunk (the carried state folded into the
                           chunk's first element), so only one chunk's [C, Din, N] states
                           are live at a time

Initialisation as in `mamba_simple`: A_log = log(1..N) per channel (S4D-real), D = 1, dt_proj
bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] (floored at dt_init_floor), dt_proj
kernel uniform in +-dt_rank^-0.5; conv bias on, no other biases.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers.conv import ShortConv, document_starts
from nl_jax.layers.linear import Linear, logical_param, to_dtype

FORMS = ("chunked", "recurrent")


# ----------------------------------------------------------------------------- functional core


def selective_scan_step(x, dt, A, B, C, D, h, reset=None):
    """One token: x, dt [Bt, Din], A [Din, N], B, C [Bt, N], D [Din], h [Bt, Din, N] -> (y [Bt, Din], h).
    `reset` bool [Bt] (optional): rows whose token starts a document, which forget h."""
    h = _decay(dt, A, reset) * h + (dt * x)[..., None] * B[:, None, :]
    y = jnp.einsum("bdn,bn->bd", h, C) + D * x
    return y, h


def _decay(dt, A, reset):
    """exp(dt A) [..., Din, N], 0 where `reset` [...] marks a document's first token."""
    decay = jnp.exp(dt[..., None] * A)
    return decay if reset is None else jnp.where(reset[..., None, None], 0.0, decay)


def _check(x, dt, A, B, C, D, h0):
    b, t, d = x.shape
    n = A.shape[-1]
    if dt.shape != x.shape or A.shape != (d, n) or B.shape != (b, t, n) or C.shape != (b, t, n):
        raise ValueError(
            f"selective scan shapes: x {x.shape}, dt {dt.shape}, A {A.shape}, B {B.shape}, C {C.shape}; "
            "expected x = dt [B, T, Din], A [Din, N], B = C [B, T, N]"
        )
    if D.shape != (d,) or h0.shape != (b, d, n):
        raise ValueError(f"selective scan: D {D.shape} must be ({d},) and h0 {h0.shape} must be {(b, d, n)}")


@jax.jit
def selective_scan_naive(x, dt, A, B, C, D, h0, reset=None):
    """Reference: token by token. x, dt [B, T, Din], A [Din, N], B, C [B, T, N], D [Din], h0 [B, Din, N];
    `reset` bool [B, T] (optional): the state restarts from zero at the flagged tokens (documents)."""
    _check(x, dt, A, B, C, D, h0)
    reset = jnp.zeros(x.shape[:2], bool) if reset is None else reset

    def step(h, inputs):
        x_t, dt_t, b_t, c_t, r_t = inputs
        y, h = selective_scan_step(x_t, dt_t, A, b_t, c_t, D, h, r_t)
        return h, y

    time_major = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (x, dt, B, C, reset))
    h, ys = jax.lax.scan(step, h0, time_major)
    return jnp.moveaxis(ys, 0, 1), h


def _combine(left, right):
    """Composition of the affine maps h -> a h + b (left first, then right)."""
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def selective_scan_chunked(x, dt, A, B, C, D, h0, reset=None, *, chunk_size: int = 64, remat: bool = False):
    """Training form, same contract as `selective_scan_naive`; any length T.

    A length that is not a multiple of `chunk_size` is padded with dt = 0 steps, which are the
    identity on the state (exp(0 A) = 1, no input), so the final state is exact. `remat` recomputes
    each chunk's [C, Din, N] states in the backward pass instead of storing them.
    """
    _check(x, dt, A, B, C, D, h0)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    reset = jnp.zeros(x.shape[:2], bool) if reset is None else reset
    return _scan_chunked(x, dt, A, B, C, D, h0, reset, chunk_size=chunk_size, remat=remat)


@functools.partial(jax.jit, static_argnames=("chunk_size", "remat"))
def _scan_chunked(x, dt, A, B, C, D, h0, reset, *, chunk_size, remat):
    b, t, _ = x.shape
    c = min(chunk_size, t)
    pad = (-t) % c
    n = (t + pad) // c

    def chunks(a):  # [B, T, ...] -> [n, B, c, ...], padded with zeros (dt = 0: identity steps)
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(b, n, c, *a.shape[2:]), 1, 0)

    def body(h, inputs):
        x_c, dt_c, b_c, c_c, r_c = inputs
        decay = _decay(dt_c, A, r_c)  # [B, c, Din, N]; 0 at a document's first token
        drive = (dt_c * x_c)[..., None] * b_c[:, :, None, :]
        drive = drive.at[:, 0].add(decay[:, 0] * h)  # the carried state enters through token 0
        _, hs = jax.lax.associative_scan(_combine, (decay, drive), axis=1)
        y = jnp.einsum("bcdn,bcn->bcd", hs, c_c) + D * x_c
        return hs[:, -1], y

    if remat:
        body = jax.checkpoint(body)
    h, ys = jax.lax.scan(body, h0, jax.tree.map(chunks, (x, dt, B, C, reset)))
    y = jnp.moveaxis(ys, 0, 1).reshape(b, n * c, -1)[:, :t]
    return y, h


# ----------------------------------------------------------------------------- layer


class MambaState(NamedTuple):
    """Decode state of one Mamba layer."""

    conv: jax.Array  # [B, d_conv - 1, Din]: the last conv inputs
    ssm: jax.Array  # [B, Din, N] float32


class Mamba(nnx.Module):
    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int = 0,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        chunk_size: int = 64,
        remat_chunks: bool = False,
        init_std: float = 0.02,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        d_inner = expand * d_model
        dt_rank = dt_rank or math.ceil(d_model / 16)  # mamba_simple's dt_rank="auto"
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.chunk_size, self.remat_chunks = chunk_size, remat_chunks
        self.dtype = to_dtype(dtype)
        lin = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # One projection to (x, z), as mamba's in_proj; the leading axis of size 2 selects the branch.
        self.in_proj = Linear((d_model,), (2, d_inner), ("embed",), (None, "mlp"), **lin)
        self.conv = ShortConv(
            d_inner, width=d_conv, channel_name="mlp", dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.conv_bias = logical_param(None, jax.nn.initializers.zeros, (d_inner,), ("mlp",), param_dtype)
        self.x_proj = Linear((d_inner,), (dt_rank + 2 * d_state,), ("mlp",), (None,), **lin)
        bound = dt_rank**-0.5
        self.dt_kernel = logical_param(
            rngs,
            lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound),
            (dt_rank, d_inner),
            (None, "mlp"),
            param_dtype,
        )

        def dt_bias_init(key, shape, dt_):
            u = jax.random.uniform(key, shape, jnp.float32)
            dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = jnp.maximum(dt, dt_init_floor)
            return (dt + jnp.log(-jnp.expm1(-dt))).astype(dt_)  # softplus^-1(dt)

        self.dt_bias = logical_param(rngs, dt_bias_init, (d_inner,), ("mlp",), param_dtype)
        a_init = lambda k, s, d: jnp.broadcast_to(jnp.log(jnp.arange(1, s[1] + 1, dtype=d)), s)  # noqa: E731
        self.A_log = logical_param(None, a_init, (d_inner, d_state), ("mlp", None), param_dtype)
        self.D = logical_param(None, jax.nn.initializers.ones, (d_inner,), ("mlp",), param_dtype)
        self.out_proj = Linear((d_inner,), (d_model,), ("mlp",), ("embed",), **lin)

    def init_state(self, batch_size: int) -> MambaState:
        return MambaState(
            self.conv.init_state(batch_size),
            jnp.zeros((batch_size, self.d_inner, self.d_state), jnp.float32),
        )

    def _scan_inputs(self, x):
        """x [B, T, Din] after conv and SiLU -> float32 (x, dt, A, B, C, D) of the selective scan."""
        p = self.x_proj(x).astype(jnp.float32)
        r, n = self.dt_rank, self.d_state
        dt_low, b, c = p[..., :r], p[..., r : r + n], p[..., r + n :]
        dt = jax.nn.softplus(dt_low @ self.dt_kernel[...].astype(jnp.float32) + self.dt_bias[...])
        a = -jnp.exp(self.A_log[...].astype(jnp.float32))
        return x.astype(jnp.float32), dt, a, b, c, self.D[...].astype(jnp.float32)

    def __call__(
        self, u: jax.Array, state: MambaState | None = None, *, form: str = "chunked", segment_ids=None
    ):
        """u [B, T, d_model] -> (y [B, T, d_model], new state; None when `state` is None).

        form: `chunked` (training) or `recurrent` (token by token: the reference and the decode path).
        With a state the call continues a stream from it, so two calls equal one over the concatenation.
        `segment_ids` int32 [B, T] (packed rows): the conv and the SSM state restart at each
        document's first token, so each document is computed as if it were alone.
        """
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        b = u.shape[0]
        xz = self.in_proj(u)
        x, z = xz[..., 0, :], xz[..., 1, :]
        x, conv_state = self.conv.forward(x, None if state is None else state.conv, segment_ids)
        x = jax.nn.silu(x + self.conv_bias[...].astype(x.dtype))
        h0 = jnp.zeros((b, self.d_inner, self.d_state), jnp.float32) if state is None else state.ssm
        inputs = self._scan_inputs(x)
        reset = None if segment_ids is None else document_starts(segment_ids)
        if form == "chunked":
            y, h = selective_scan_chunked(
                *inputs, h0.astype(jnp.float32), reset, chunk_size=self.chunk_size, remat=self.remat_chunks
            )
        else:
            y, h = selective_scan_naive(*inputs, h0.astype(jnp.float32), reset)
        y = y.astype(self.dtype) * jax.nn.silu(z)
        out = self.out_proj(y)
        return out, (None if state is None else MambaState(conv_state, h))


def mamba_flops_per_token(d_model: int, d_inner: int, d_state: int, dt_rank: int, d_conv: int) -> float:
    """Forward FLOPs of one Mamba layer per token: projections, conv, and the scan (~6 Din N:
    discretise, decay-and-add, read with C)."""
    proj = 2 * d_model * 2 * d_inner + 2 * d_inner * (dt_rank + 2 * d_state) + 2 * dt_rank * d_inner
    proj += 2 * d_inner * d_model
    return float(proj + 2 * d_conv * d_inner + 6 * d_inner * d_state)
