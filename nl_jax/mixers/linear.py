"""The linear fast-weight token mixer of RetNet, DeltaNet, Gated DeltaNet and Comba (layouts as in
fla-org/flash-linear-attention).

Mixer, per head h (q, k [Dk], v [Dv]; the state S [Dv, Dk] is a float32 fast weight, docs/design.md,
Decision 10):

    q, k, v = x W_q, x W_k, x W_v        then optionally a causal depthwise conv (width 4) + SiLU,
                                          l2-normalised q and k, rotary position on q and k
    q = q / sqrt(Dk)                      (fla's default scale of the read)
    linear_attention  S_t = gamma_h S_{t-1} + v_t k_t^T,                      gamma_h = 1 - 2^(-5-h)
                      (RetNet's retention)
    delta_rule        S_t = S_{t-1} - beta_t (S_{t-1} k_t - v_t) k_t^T,       beta_t = sigmoid(x W_b)
    gated_delta_rule  S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,
                      alpha_t = exp(-exp(A_log) softplus(x W_a + dt_bias))     (Mamba2's gate, as fla)
    comba             S_t = alpha_t S_{t-1} (I - beta_t p_t k_t^T) + beta_t v_t k_t^T,
                      p_t = sigmoid(lambda_h) k_t
                      (the same gates; its read query is corrected: q_t - d_h p_t, see `comba`)
    o_t = S_t q_t;  y = W_o (RMSNorm_head(o) [* act(x W_g)])   act: SiLU, or sigmoid (`output_gate_act`)

Each mechanism is the preset of `nl_jax.memory.ops` of the same name (`presets.linear_attention /
delta_rule / gated_delta_rule / comba`), run in one of three forms selected by the `form` keyword:
`chunked` (training: `memory_chunked`), `naive` (the token-by-token reference `memory_naive`) and
`recurrent` (`memory_recurrent`, what decoding uses).

Packed rows ("reset" of `data.document_boundaries`): given segment ids, the state's retention gate is
0 at each document's first token (gamma_h, alpha_t, and for DeltaNet a gate of its own that is 1
elsewhere, making it the gated delta rule with alpha in {0, 1}), which erases the state before that
token: the memory starts from zero, its initial state, as at the row's start. The short convs do
not read across the boundary either, and rotary positions enter only as differences, so each
document gives what it gives alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers import Linear, RMSNorm, ShortConv, apply_rope, logical_param, to_dtype
from nl_jax.layers.conv import document_continues
from nl_jax.memory import ops
from nl_jax.memory.ops import presets
from nl_jax.mixers.attention import head_dim_of
from nl_jax.mixers.front_end import conv_silu, gated_output, l2_normalize
from nl_jax.parallel.rules import constrain

MECHANISMS = ("linear_attention", "delta_rule", "gated_delta_rule", "comba")
GATE_ACTS = {"silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid}
FORMS = ("chunked", "naive", "recurrent")
QK_NORMS = ("l2", "none")

_HEADS = ("batch", "length", "activation_heads", None)
# Gate values that leave the state untouched: padded tokens of a chunked call use them, so the final
# state is exact whatever the length.
_NEUTRAL = {"lr": 0.0, "decay": 1.0, "beta": 0.0, "alpha": 1.0, "p": 0.0}


@dataclasses.dataclass(frozen=True)
class MixerSettings:
    """Static shape and options of one mixer (one per model, read from the config)."""

    mechanism: str
    num_heads: int
    head_dim: int  # Dk
    value_dim: int  # Dv
    conv_width: int = 0
    qk_norm: str = "none"
    rope_theta: float = 0.0
    output_gate: bool = True
    output_gate_act: str = "silu"
    correction_factor: float = 1.0  # Comba: the initial output correction d_h
    chunk_size: int = 64
    remat_chunks: bool = False
    memory_impl: str = "xla"  # the chunked form's implementation (ops.memory_chunked's impl)

    def __post_init__(self):
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if self.output_gate_act not in GATE_ACTS:
            acts = tuple(GATE_ACTS)
            raise ValueError(f"output_gate_act must be one of {acts}, got {self.output_gate_act!r}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.memory_impl not in ops.IMPLS:
            raise ValueError(f"memory_impl must be one of {ops.IMPLS}, got {self.memory_impl!r}")
        if self.rope_theta and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")


def mixer_settings(cfg, mechanism: str) -> MixerSettings:
    """MixerSettings from a `model` config section, with the 0 = default conventions resolved."""
    heads = cfg.num_heads
    head_dim = head_dim_of(cfg)
    value_dim = head_dim * cfg.expand_v
    if value_dim != int(value_dim):
        raise ValueError(f"head_dim * expand_v must be an integer, got {head_dim} * {cfg.expand_v}")
    return MixerSettings(
        mechanism=mechanism,
        num_heads=heads,
        head_dim=head_dim,
        value_dim=int(value_dim),
        conv_width=cfg.conv_width,
        qk_norm=cfg.qk_norm,
        rope_theta=cfg.rope_theta,
        output_gate=cfg.output_gate,
        output_gate_act=cfg.get("output_gate_act", "silu"),  # configs saved before the field existed
        correction_factor=cfg.get("correction_factor", 1.0),
        chunk_size=cfg.chunk_size,
        remat_chunks=cfg.remat_chunks,
        memory_impl=cfg.get("memory_impl", "xla"),  # configs saved before the field existed
    )


def retention_decays(num_heads: int) -> jax.Array:
    """RetNet's fixed per-head decays gamma_h = 1 - 2^(-5-h), h = 0..H-1 (float32 [H])."""
    return 1.0 - 2.0 ** (-5.0 - jnp.arange(num_heads, dtype=jnp.float32))


class MixerState(NamedTuple):
    """Decode state of one mixer: conv tails of q/k/v (None without conv), fast weights, position."""

    conv: tuple[jax.Array, jax.Array, jax.Array] | None
    memory: jax.Array  # [B, H, Dv, Dk] float32
    pos: jax.Array  # int32 []: position of the next token (for rotary)


def _mechanism(mechanism: str, gates: dict) -> presets.Mechanism:
    if mechanism == "linear_attention":
        return presets.linear_attention(gates["lr"], gates["decay"])
    if mechanism == "comba":
        return presets.comba(gates["alpha"], gates["beta"], gates["p"])
    if "alpha" in gates:  # gated delta, or the delta rule restarted at documents' first tokens
        return presets.gated_delta_rule(gates["alpha"], gates["beta"])
    return presets.delta_rule(gates["beta"])


def restart_at_documents(gates: dict, segment_ids: jax.Array) -> dict:
    """The gates with the state's retention set to 0 at each document's first token (see the module
    docstring); DeltaNet, which has no retention gate, gets one."""
    keep = document_continues(segment_ids)[..., None]  # [B, T, 1] against gates [B, T, H]
    if "decay" in gates:
        return {**gates, "decay": gates["decay"] * keep}
    if "alpha" in gates:
        return {**gates, "alpha": gates["alpha"] * keep}
    return {**gates, "alpha": jnp.broadcast_to(keep, gates["beta"].shape)}


def run_matrix_memory(
    mechanism: Callable[[dict], presets.Mechanism],
    s0,
    q,
    k,
    v,
    gates: dict,
    *,
    neutral: dict,
    form: str,
    chunk_size: int,
    remat: bool = False,
    impl: str = "xla",
):
    """One of the three forms of the memory core over a matrix memory without momentum (the linear
    family's and RWKV-7's). q, k [B, T, H, Dk], v [B, T, H, Dv], gates name -> float32 [B, T, H, ...],
    s0 [B, H, Dv, Dk]; `mechanism(gates)` builds the preset. Returns (o [B, T, H, Dv], final state
    [B, H, Dv, Dk]).

    The chunked form pads the sequence to a multiple of its chunk with zero inputs and the gates'
    `neutral` values (no update), so any length works and the final state is exact; `impl` picks
    its implementation.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    state = ops.init_state(ops.LinearWeights(s0), momentum=False)
    t = q.shape[1]
    if form == "chunked":
        c = min(chunk_size, t)
        pad = -t % c
        if pad:
            widths = lambda z: [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2)  # noqa: E731
            q, k, v = (jnp.pad(z, widths(z)) for z in (q, k, v))
            gates = {n: jnp.pad(g, widths(g), constant_values=neutral[n]) for n, g in gates.items()}
        m = mechanism(gates)
        o, final = ops.memory_chunked(
            m.spec, state, q, k, v, m.rates, chunk_size=c, read=m.read, remat=remat, impl=impl
        )
        return o[:, :t], final.weights.w
    m = mechanism(gates)
    if form == "naive":
        o, final = ops.memory_naive(m.spec, state, q, k, v, m.rates, chunk_size=1, read=m.read)
        return o, final.weights.w
    o, final = ops.memory_recurrent_scan(m.spec, state, q, k, v, m.rates, chunk_size=1, read=m.read)
    return o, final.weights.w
    o, final = ops.memory_recurrent_scan(m.spec, state, q, k, v, m.rates, chunk_size=1, read=m.read)
    return o, final.weights.w


def _a_log_init(key, shape, dtype):
    """Mamba2 / fla: A ~ U(0, 16] per head, stored as log A."""
    return jnp.log(jax.random.uniform(key, shape, dtype, 1e-4, 16.0))


def _dt_bias_init(key, shape, dtype):
    """Mamba2 / fla: dt ~ logU(1e-3, 1e-1) (floored at 1e-4), stored as softplus^-1(dt)."""
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(1e-3), math.log(1e-1)))
    dt = jnp.maximum(dt, 1e-4)
    return dt + jnp.log(-jnp.expm1(-dt))


class LinearMixer(nnx.Module):
    """The token mixer of the module docstring: x [B, T, D] -> y [B, T, D]."""

    def __init__(
        self,
        d_model: int,
        s: MixerSettings,
        *,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        self.s, self.dtype = s, to_dtype(dtype)
        h, dk, dv = s.num_heads, s.head_dim, s.value_dim
        lin = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        head_names = ("heads", "head_dim")
        self.q_proj = Linear((d_model,), (h, dk), ("embed",), head_names, **lin)
        self.k_proj = Linear((d_model,), (h, dk), ("embed",), head_names, **lin)
        self.v_proj = Linear((d_model,), (h, dv), ("embed",), head_names, **lin)
        if s.conv_width:
            conv = dict(
                width=s.conv_width, channel_name="heads", dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
            self.q_conv = ShortConv(h * dk, **conv)
            self.k_conv = ShortConv(h * dk, **conv)
            self.v_conv = ShortConv(h * dv, **conv)
        if s.mechanism in ("delta_rule", "gated_delta_rule", "comba"):
            self.b_proj = Linear((d_model,), (h,), ("embed",), ("heads",), **lin)
        if s.mechanism in ("gated_delta_rule", "comba"):
            self.a_proj = Linear((d_model,), (h,), ("embed",), ("heads",), **lin)
            self.A_log = logical_param(rngs, _a_log_init, (h,), ("heads",), param_dtype)
            self.dt_bias = logical_param(rngs, _dt_bias_init, (h,), ("heads",), param_dtype)
        if s.mechanism == "comba":  # fla's Comba: lambda_h = 1 (p = 0.73 k), d_h = correction_factor
            self.inner_decay = logical_param(None, jax.nn.initializers.ones, (h,), ("heads",), param_dtype)
            correction = lambda key, shape, dtype: jnp.full(shape, s.correction_factor, dtype)  # noqa: E731
            self.correction = logical_param(None, correction, (h,), ("heads",), param_dtype)
        if s.output_gate:
            self.g_proj = Linear((d_model,), (h, dv), ("embed",), head_names, **lin)
        self.o_norm = RMSNorm(dv, eps=norm_eps, names=("head_dim",), param_dtype=param_dtype)
        self.o_proj = Linear((h, dv), (d_model,), head_names, ("embed",), **lin)

    def init_state(self, batch_size: int) -> MixerState:
        s = self.s
        conv = None
        if s.conv_width:
            conv = tuple(c.init_state(batch_size) for c in (self.q_conv, self.k_conv, self.v_conv))
        memory = jnp.zeros((batch_size, s.num_heads, s.value_dim, s.head_dim), jnp.float32)
        return MixerState(conv, memory, jnp.zeros((), jnp.int32))

    def _gates(self, x, shape):
        """Per-token, per-head gates [B, T, H] in float32."""
        s = self.s
        if s.mechanism == "linear_attention":
            return {
                "lr": jnp.ones(shape, jnp.float32),
                "decay": jnp.broadcast_to(retention_decays(s.num_heads), shape),
            }
        gates = {"beta": jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))}
        if s.mechanism in ("gated_delta_rule", "comba"):
            a = self.a_proj(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
            log_alpha = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a)
            gates["alpha"] = jnp.exp(log_alpha)
        return gates

    def _qkv(self, x, state: MixerState | None, segment_ids=None):
        s = self.s
        t = x.shape[1]
        projections = (self.q_proj, self.k_proj, self.v_proj)
        conv = None
        if s.conv_width:
            tails = (None, None, None) if state is None else state.conv
            convs = (self.q_conv, self.k_conv, self.v_conv)
            (q, k, v), conv = conv_silu(projections, convs, x, tails, segment_ids)
        else:
            q, k, v = (proj(x) for proj in projections)
        q, k, v = (constrain(z.astype(jnp.float32), _HEADS) for z in (q, k, v))
        if s.qk_norm == "l2":
            q, k = l2_normalize(q), l2_normalize(k)
        pos0 = jnp.zeros((), jnp.int32) if state is None else state.pos
        if s.rope_theta:
            positions = pos0 + jnp.arange(t)
            q, k = apply_rope(q, positions, s.rope_theta), apply_rope(k, positions, s.rope_theta)
        return q * s.head_dim**-0.5, k, v, conv, pos0 + t

    def __call__(
        self, x: jax.Array, state: MixerState | None = None, form: str = "chunked", segment_ids=None
    ):
        """x [B, T, D] -> (y [B, T, D], new state). Without a state the memory starts at zero and the
        returned state is None (a training forward). `segment_ids` [B, T]: restart at each document."""
        s = self.s
        b, t, _ = x.shape
        q, k, v, conv, pos = self._qkv(x, state, segment_ids)
        gates = self._gates(x, (b, t, s.num_heads))
        if s.mechanism == "comba":  # the state feedback p and the output correction of the query
            gates["p"] = jax.nn.sigmoid(self.inner_decay[...].astype(jnp.float32))[:, None] * k
            q = q - self.correction[...].astype(jnp.float32)[:, None] * gates["p"] * s.head_dim**-0.5
        if segment_ids is not None:
            gates = restart_at_documents(gates, segment_ids)
        s0 = self.init_state(b).memory if state is None else state.memory
        o, memory = run_matrix_memory(
            functools.partial(_mechanism, s.mechanism),
            s0,
            q,
            k,
            v,
            gates,
            neutral=_NEUTRAL,
            form=form,
            chunk_size=s.chunk_size,
            remat=s.remat_chunks,
            impl=s.memory_impl,
        )
        gate = self.g_proj if s.output_gate else None
        y = gated_output(
            x, o, self.o_norm, gate, self.o_proj, dtype=self.dtype, act=GATE_ACTS[s.output_gate_act]
        )
        return y, (None if state is None else MixerState(conv, memory, pos))


def memory_flops_per_token(s: MixerSettings, seq_len: int) -> float:
    """Forward FLOPs per token of the chunked memory form, per layer (all heads).

    Per chunk of C tokens and head (Dk, Dv), from `memory_chunked`: the reads Q S_0^T, Q K^T and
    (mask * Q K^T) V, and the state update; the delta rules add K S_0^T, the Gram matrix K K^T, its
    two products with the values, the unit lower-triangular inverse (~2/3 C^3 in log2 C levels of
    block matmuls) and its product with the right-hand side, the extra read and state terms.
    """
    c = min(s.chunk_size, seq_len)
    dk, dv = s.head_dim, s.value_dim
    per_chunk = 2 * c * dk * dv + 2 * c * c * dk + 2 * c * c * dv + 2 * c * dk * dv
    if s.mechanism != "linear_attention":
        per_chunk += 2 * c * dk * dv + 2 * c * c * dk + 2 * c * c * dv  # K S_0^T, K K^T, (mask*KK^T) E
        per_chunk += (2 / 3) * c**3 + 2 * c * c * dv  # inverse and inverse @ rhs
        per_chunk += 2 * c * c * dv + 2 * c * dk * dv  # DGD read and state terms
    return s.num_heads * per_chunk / c
