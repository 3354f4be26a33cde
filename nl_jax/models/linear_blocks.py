"""What RetNet, DeltaNet and Gated DeltaNet share: a linear fast-weight token mixer over the memory core,
a pre-norm block and the language model around it (layouts as in fla-org/flash-linear-attention).

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
    o_t = S_t q_t;  y = W_o (RMSNorm_head(o) [* SiLU(x W_g)])

Each mechanism is the preset of `nl_jax.memory.ops` of the same name (`presets.linear_attention /
delta_rule / gated_delta_rule`), run in one of three forms selected by the `form` keyword:
`chunked` (training: `memory_chunked`), `naive` (the token-by-token reference `memory_naive`) and
`recurrent` (`memory_recurrent`, what decoding uses). Block: h = x + Mixer(Norm(x)); y = h + SwiGLU(Norm(h)).

Packed rows ("reset" of `data.document_boundaries`): given segment ids, the state's retention gate is
0 at each document's first token (gamma_h, alpha_t, and for DeltaNet a gate of its own that is 1
elsewhere, making it the gated delta rule with alpha in {0, 1}), which erases the state before that
token: the memory starts from zero, its initial state, as at the row's start. The short convs do
not read across the boundary either, and rotary positions enter only as differences, so each
document gives what it gives alone.

Config (`model` section): vocab_size, d_model, num_layers, num_heads, head_dim (0: d_model //
num_heads), expand_v (value head width = head_dim * expand_v), mlp_hidden, conv_width (0: no conv),
qk_norm ('l2' | 'none'), rope_theta (0: no rotary), output_gate, chunk_size, remat_chunks,
memory_impl ('xla' | 'pallas': `memory_chunked`'s implementation of the chunked form), tie_embeddings,
norm_eps, dtype, param_dtype, scan_layers, remat_policy, init_std.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers import Linear, RMSNorm, ShortConv, SwiGLU, apply_rope, logical_param, to_dtype
from nl_jax.layers.attention import head_dim_of
from nl_jax.memory import ops
from nl_jax.memory.ops import presets
from nl_jax.models.lm import RESIDUAL, FormsLM
from nl_jax.parallel.rules import constrain

MECHANISMS = ("linear_attention", "delta_rule", "gated_delta_rule")
FORMS = ("chunked", "naive", "recurrent")
QK_NORMS = ("l2", "none")

_HEADS = ("batch", "length", "activation_heads", None)
# Gate values that leave the state untouched: padded tokens of a chunked call use them, so the final
# state is exact whatever the length.
_NEUTRAL = {"lr": 0.0, "decay": 1.0, "beta": 0.0, "alpha": 1.0}


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
    chunk_size: int = 64
    remat_chunks: bool = False
    memory_impl: str = "xla"  # the chunked form's implementation (ops.memory_chunked's impl)

    def __post_init__(self):
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
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
    if "alpha" in gates:  # gated delta, or the delta rule restarted at documents' first tokens
        return presets.gated_delta_rule(gates["alpha"], gates["beta"])
    return presets.delta_rule(gates["beta"])


def document_continues(segment_ids: jax.Array) -> jax.Array:
    """float32 [B, T]: 0 at each document's first token after the row's first token, else 1 (the
    row's first token starts from the initial state anyway)."""
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return (segment_ids == prev).astype(jnp.float32)


def restart_at_documents(gates: dict, segment_ids: jax.Array) -> dict:
    """The gates with the state's retention set to 0 at each document's first token (see the module
    docstring); DeltaNet, which has no retention gate, gets one."""
    keep = document_continues(segment_ids)[..., None]  # [B, T, 1] against gates [B, T, H]
    if "decay" in gates:
        return {**gates, "decay": gates["decay"] * keep}
    if "alpha" in gates:
        return {**gates, "alpha": gates["alpha"] * keep}
    return {**gates, "alpha": jnp.broadcast_to(keep, gates["beta"].shape)}


def run_memory(
    mechanism: str,
    s0,
    q,
    k,
    v,
    gates: dict,
    *,
    form: str,
    chunk_size: int,
    remat: bool = False,
    impl: str = "xla",
):
    """One of the three forms of the memory core. q, k [B, T, H, Dk], v [B, T, H, Dv], gates [B, T, H]
    (float32), s0 [B, H, Dv, Dk]. Returns (o [B, T, H, Dv], final state [B, H, Dv, Dk]).

    The chunked form pads the sequence to a multiple of its chunk with zero inputs and neutral gates
    (no update), so any length works and the final state is exact; `impl` picks its implementation.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    state = ops.init_state(ops.LinearWeights(s0), momentum=False)
    t = q.shape[1]
    if form == "chunked":
        c = min(chunk_size, t)
        pad = -t % c
        if pad:
            zeros = lambda z: jnp.pad(z, [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2))  # noqa: E731
            q, k, v = zeros(q), zeros(k), zeros(v)
            gates = {
                n: jnp.pad(g, [(0, 0), (0, pad), (0, 0)], constant_values=_NEUTRAL[n])
                for n, g in gates.items()
            }
        m = _mechanism(mechanism, gates)
        o, final = ops.memory_chunked(
            m.spec, state, q, k, v, m.rates, chunk_size=c, read=m.read, remat=remat, impl=impl
        )
        return o[:, :t], final.weights.w
    m = _mechanism(mechanism, gates)
    if form == "naive":
        o, final = ops.memory_naive(m.spec, state, q, k, v, m.rates, chunk_size=1, read=m.read)
        return o, final.weights.w

    def step(mem, xs):
        y, mem = ops.memory_recurrent(m.spec, mem, *xs, chunk_size=1, read=m.read)
        return mem, y

    time_major = jax.tree.map(lambda z: jnp.moveaxis(z, 1, 0), (q, k, v, m.rates))
    final, ys = jax.lax.scan(step, state, time_major)
    return jnp.moveaxis(ys, 0, 1), final.weights.w


def _a_log_init(key, shape, dtype):
    """Mamba2 / fla: A ~ U(0, 16] per head, stored as log A."""
    return jnp.log(jax.random.uniform(key, shape, dtype, 1e-4, 16.0))


def _dt_bias_init(key, shape, dtype):
    """Mamba2 / fla: dt ~ logU(1e-3, 1e-1) (floored at 1e-4), stored as softplus^-1(dt)."""
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(1e-3), math.log(1e-1)))
    dt = jnp.maximum(dt, 1e-4)
    return dt + jnp.log(-jnp.expm1(-dt))


def _l2_normalize(z):
    return z * jax.lax.rsqrt(jnp.sum(z * z, axis=-1, keepdims=True) + 1e-6)


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
        if s.mechanism in ("delta_rule", "gated_delta_rule"):
            self.b_proj = Linear((d_model,), (h,), ("embed",), ("heads",), **lin)
        if s.mechanism == "gated_delta_rule":
            self.a_proj = Linear((d_model,), (h,), ("embed",), ("heads",), **lin)
            self.A_log = logical_param(rngs, _a_log_init, (h,), ("heads",), param_dtype)
            self.dt_bias = logical_param(rngs, _dt_bias_init, (h,), ("heads",), param_dtype)
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
        if s.mechanism == "gated_delta_rule":
            a = self.a_proj(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
            log_alpha = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a)
            gates["alpha"] = jnp.exp(log_alpha)
        return gates

    def _qkv(self, x, state: MixerState | None, segment_ids=None):
        s = self.s
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv = None
        if s.conv_width:
            tails = (None, None, None) if state is None else state.conv
            outs, conv = [], []
            for z, layer, tail in zip((q, k, v), (self.q_conv, self.k_conv, self.v_conv), tails):
                y, tail = layer.forward(z.reshape(b, t, -1), tail, segment_ids)
                outs.append(jax.nn.silu(y).reshape(z.shape))
                conv.append(tail)
            q, k, v = outs
            conv = tuple(conv)
        q, k, v = (constrain(z.astype(jnp.float32), _HEADS) for z in (q, k, v))
        if s.qk_norm == "l2":
            q, k = _l2_normalize(q), _l2_normalize(k)
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
        if segment_ids is not None:
            gates = restart_at_documents(gates, segment_ids)
        s0 = self.init_state(b).memory if state is None else state.memory
        o, memory = run_memory(
            s.mechanism,
            s0,
            q,
            k,
            v,
            gates,
            form=form,
            chunk_size=s.chunk_size,
            remat=s.remat_chunks,
            impl=s.memory_impl,
        )
        o = self.o_norm(o.astype(self.dtype))
        if s.output_gate:
            o = o * jax.nn.silu(self.g_proj(x))
        y = self.o_proj(o)
        return y, (None if state is None else MixerState(conv, memory, pos))


class LinearBlock(nnx.Module):
    """h = x + Mixer(Norm(x)); y = h + SwiGLU(Norm(h)). Block state: the mixer's MixerState."""

    def __init__(self, cfg, settings: MixerSettings, *, rngs: nnx.Rngs):
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        kw = dict(init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.attn = LinearMixer(cfg.d_model, settings, norm_eps=cfg.norm_eps, **kw)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, **kw)

    def init_state(self, batch_size: int, max_len: int | None = None) -> MixerState:
        del max_len  # constant size
        return self.attn.init_state(batch_size)

    def __call__(self, x, state=None, form: str = "chunked", segment_ids=None):
        a, state = self.attn(self.attn_norm(x), state, form=form, segment_ids=segment_ids)
        h = x + a
        y = h + self.mlp(self.mlp_norm(h))
        return constrain(y, RESIDUAL), state


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


class LinearLM(FormsLM):
    """The shell around `num_layers` LinearBlocks. Subclasses set MECHANISM and register themselves."""

    MECHANISM = "linear_attention"
    # No attention to mask: segment ids restart the memory (module docstring).
    document_boundaries = ("ignore", "reset")

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        settings = mixer_settings(cfg, self.MECHANISM)
        super().__init__(cfg, lambda r: LinearBlock(cfg, settings, rngs=r), rngs=rngs)
        self.settings = settings

    @classmethod
    def forward_flops_per_token(cls, model_cfg, seq_len: int) -> float:
        """Matmul FLOPs of every projection and the logits, the short convs, and the chunked memory."""
        s = mixer_settings(model_cfg, cls.MECHANISM)
        d, h, dk, dv = model_cfg.d_model, s.num_heads, s.head_dim, s.value_dim
        proj = d * h * (2 * dk + dv) + h * dv * d + 3 * d * model_cfg.mlp_hidden
        gates = {"linear_attention": 0, "delta_rule": 1, "gated_delta_rule": 2}[s.mechanism]  # beta, alpha
        proj += d * h * (gates + (dv if s.output_gate else 0))
        conv = s.conv_width * h * (2 * dk + dv)
        per_layer = 2 * proj + 2 * conv + memory_flops_per_token(s, seq_len)
        return model_cfg.num_layers * per_layer + 2 * d * model_cfg.vocab_size
