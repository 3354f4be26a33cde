"""RWKV-7's time mix and channel mix (Peng et al. 2025, "RWKV-7 "Goose" with Expressive Dynamic State
Evolution", arXiv 2503.14456), laid out as the paper's reference code (x070) and fla-org's RWKV7
layer; the model around them is `nl_jax.models.rwkv7`.

Time mix, per head (r, k, kk [Dk], v [Dv]; the state S [Dv, Dk] is a float32 fast weight):

    x' = x_{t-1} - x_t                              token shift (x_{-1} = 0; decoding carries x_{t-1})
    x_c = x + x' * mu_c   for c in r, w, k, v, a, g  (learned per-channel lerp)
    r = x_r W_r,  k = x_k W_k,  v = x_v W_v
    w = exp(-e^{-1/2} sigmoid(w0 + tanh(x_w A_w) B_w))   decay per key channel, in (e^{-e^{-1/2}}, 1)
    a = sigmoid(a0 + x_a A_a B_a)                         in-context learning rate, a vector
    v = v + (v_1 - v) sigmoid(v0 + x_v A_v B_v)           value residual to layer 0's value v_1
    g = sigmoid(x_g A_g) B_g                              output gate
    kk = l2norm(k * k_k),  k = k * (1 + (a - 1) k_a)      removal key, replacement key
    S_t = S_{t-1} (diag(w_t) - kk_t (kk_t * a_t)^T) + v_t k_t^T,   o_t = S_t r_t
    y = W_o ((GroupNorm_head(o) + <r * k * r_k> v) * g)   (the "bonus" term per head)

Channel mix: y = W_2 relu(x_k W_1)^2 with x_k = x + (x_{t-1} - x) mu_k (its own token shift).

The state update is `presets.generalized_delta_rule(w, kk, kk * a)` through the memory core, in one of
three forms (`form`): `chunked` (training: `memory_chunked` with vector gates, `vector_chunked`),
`naive` (`memory_naive`, token by token) and `recurrent` (`memory_recurrent`, what decoding uses).

Decisions where the sources leave a choice:
- The reference scales neither r nor the read (fla: scale 1); so here too.
- The group norm's epsilon is head_dim * norm_eps (the reference's 64e-5 at head size 64).
- Packed rows ("reset" of `data.document_boundaries`): given segment ids, a document's first token
  has decay 0 and no erase (the state restarts from zero, as at the row's start) and a zero previous
  token in both token shifts, so each document gives what it gives alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers import LayerNorm, Linear, logical_param, to_dtype
from nl_jax.memory.ops import presets
from nl_jax.mixers.linear import run_matrix_memory
from nl_jax.parallel.rules import constrain

LOG_DECAY_SCALE = math.exp(-0.5)  # w = exp(-e^{-1/2} sigmoid(.)): the reference's bound on the decay
_HEADS = ("batch", "length", "activation_heads", None)
LERPS = ("r", "w", "k", "v", "a", "g")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Static shape and options of one RWKV-7 layer (read from the config)."""

    d_model: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    decay_rank: int
    a_rank: int
    v_rank: int
    gate_rank: int
    chunk_size: int
    remat_chunks: bool
    norm_eps: float


def settings_of(cfg) -> Settings:
    if cfg.d_model % cfg.head_dim:
        raise ValueError(f"d_model {cfg.d_model} is not a multiple of head_dim {cfg.head_dim}")
    if cfg.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {cfg.chunk_size}")
    return Settings(
        d_model=cfg.d_model,
        num_heads=cfg.d_model // cfg.head_dim,
        head_dim=cfg.head_dim,
        mlp_hidden=cfg.mlp_hidden,
        decay_rank=cfg.decay_rank,
        a_rank=cfg.a_rank,
        v_rank=cfg.v_rank,
        gate_rank=cfg.gate_rank,
        chunk_size=cfg.chunk_size,
        remat_chunks=cfg.remat_chunks,
        norm_eps=cfg.norm_eps,
    )


class LoRA(nnx.Module):
    """x -> [bias +] act(x A) B: a low-rank projection [.., D] -> [.., *out_shape]."""

    def __init__(self, d: int, rank: int, out_shape, act=None, bias=True, *, lin, param_dtype, rngs):
        self.act = act
        self.down = Linear((d,), (rank,), ("embed",), ("lora",), rngs=rngs, **lin)
        self.up = Linear((rank,), tuple(out_shape), ("lora",), ("heads", "head_dim"), rngs=rngs, **lin)
        init = jax.nn.initializers.zeros
        self.bias = logical_param(None, init, out_shape, ("heads", "head_dim"), param_dtype) if bias else None

    def __call__(self, x):
        h = self.down(x)
        y = self.up(h if self.act is None else self.act(h)).astype(jnp.float32)
        return y if self.bias is None else y + self.bias[...].astype(jnp.float32)


def token_shift(x, last, keep=None):
    """x_{t-1} for x [B, T, D], with `last` [B, D] (or None: zeros) before the first token, and zero
    where `keep` [B, T] is 0 (a document's first token); and the new last token."""
    first = jnp.zeros_like(x[:, :1]) if last is None else last[:, None].astype(x.dtype)
    prev = jnp.concatenate([first, x[:, :-1]], axis=1)
    return (prev if keep is None else prev * keep[..., None].astype(x.dtype)), x[:, -1]


def _l2_normalize(z):
    """F.normalize: z / max(||z||, 1e-12)."""
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def _mechanism(gates: dict) -> presets.Mechanism:
    return presets.generalized_delta_rule(gates["decay"], gates["kk"], gates["kk"] * gates["a"])


# A padded token leaves the state as it is: decay 1, zero erase (and zero key and value).
_NEUTRAL = {"decay": 1.0, "kk": 0.0, "a": 0.0}


class TimeMixState(NamedTuple):
    shift: jax.Array  # [B, D] the last input token (after the block's norm)
    memory: jax.Array  # [B, H, Dv, Dk] float32


class TimeMix(nnx.Module):
    """RWKV-7's token mixer (module docstring): (x [B, T, D], v_first) -> (y [B, T, D], v_first)."""

    def __init__(self, s: Settings, *, init_std, dtype, param_dtype, rngs: nnx.Rngs):
        self.s, self.dtype = s, to_dtype(dtype)
        d, h, n = s.d_model, s.num_heads, s.head_dim
        lin = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype)
        heads = ("heads", "head_dim")
        zeros = jax.nn.initializers.zeros
        for c in LERPS:
            setattr(self, f"mu_{c}", logical_param(None, zeros, (d,), ("embed",), param_dtype))
        self.r_proj = Linear((d,), (h, n), ("embed",), heads, rngs=rngs, **lin)
        self.k_proj = Linear((d,), (h, n), ("embed",), heads, rngs=rngs, **lin)
        self.v_proj = Linear((d,), (h, n), ("embed",), heads, rngs=rngs, **lin)
        lora = dict(lin=lin, param_dtype=param_dtype, rngs=rngs)
        self.w_lora = LoRA(d, s.decay_rank, (h, n), jnp.tanh, **lora)
        self.a_lora = LoRA(d, s.a_rank, (h, n), **lora)
        self.v_lora = LoRA(d, s.v_rank, (h, n), **lora)
        self.g_lora = LoRA(d, s.gate_rank, (h, n), jax.nn.sigmoid, bias=False, **lora)
        self.k_k = logical_param(None, zeros, (h, n), heads, param_dtype)
        self.k_a = logical_param(None, zeros, (h, n), heads, param_dtype)
        self.r_k = logical_param(None, zeros, (h, n), heads, param_dtype)
        self.o_norm = LayerNorm((h, n), eps=n * s.norm_eps, names=heads, param_dtype=param_dtype)
        self.o_proj = Linear((h, n), (d,), heads, ("embed",), rngs=rngs, **lin)

    def init_state(self, batch_size: int) -> TimeMixState:
        s = self.s
        memory = jnp.zeros((batch_size, s.num_heads, s.head_dim, s.head_dim), jnp.float32)
        return TimeMixState(jnp.zeros((batch_size, s.d_model), self.dtype), memory)

    def __call__(
        self, x, v_first, first_layer, state: TimeMixState | None = None, form: str = "chunked", keep=None
    ):
        """x [B, T, D]; v_first [B, T, H, Dv] layer 0's values (read unless `first_layer`, a bool
        array); `keep` [B, T] float: 0 at a document's first token (restart), else 1, or None.
        Returns (y, v_first, new state or None)."""
        s = self.s
        b, t, _ = x.shape
        prev, last = token_shift(x, None if state is None else state.shift, keep)
        dx = prev - x
        xs = {c: x + dx * getattr(self, f"mu_{c}")[...].astype(x.dtype) for c in LERPS}
        heads = lambda z: constrain(z.astype(jnp.float32), _HEADS)  # noqa: E731
        r, k, v = heads(self.r_proj(xs["r"])), heads(self.k_proj(xs["k"])), heads(self.v_proj(xs["v"]))
        decay = jnp.exp(-LOG_DECAY_SCALE * jax.nn.sigmoid(self.w_lora(xs["w"])))
        v_first = jnp.where(first_layer, v, v_first.astype(jnp.float32))
        v = v + (v_first - v) * jax.nn.sigmoid(self.v_lora(xs["v"]))
        a = jax.nn.sigmoid(self.a_lora(xs["a"]))
        g = self.g_lora(xs["g"])
        kk = _l2_normalize(k * self.k_k[...].astype(jnp.float32))
        k = k * (1 + (a - 1) * self.k_a[...].astype(jnp.float32))
        if keep is not None:  # restart: forget everything (decay 0) and erase nothing
            decay, kk = decay * keep[..., None, None], kk * keep[..., None, None]
        s0 = self.init_state(b).memory if state is None else state.memory
        o, memory = run_matrix_memory(
            _mechanism,
            s0,
            r,
            k,
            v,
            {"decay": decay, "kk": kk, "a": a},
            neutral=_NEUTRAL,
            form=form,
            chunk_size=s.chunk_size,
            remat=s.remat_chunks,
        )
        bonus = jnp.sum(r * k * self.r_k[...].astype(jnp.float32), axis=-1, keepdims=True) * v
        o = (self.o_norm(o) + bonus) * g
        y = self.o_proj(o.astype(self.dtype))
        return y, v_first, (None if state is None else TimeMixState(last, memory))


class ChannelMix(nnx.Module):
    """y = W_2 relu(x_k W_1)^2, x_k = x + (x_{t-1} - x) mu_k."""

    def __init__(self, s: Settings, *, init_std, dtype, param_dtype, rngs: nnx.Rngs):
        lin = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mu_k = logical_param(None, jax.nn.initializers.zeros, (s.d_model,), ("embed",), param_dtype)
        self.key = Linear((s.d_model,), (s.mlp_hidden,), ("embed",), ("mlp",), **lin)
        self.value = Linear((s.mlp_hidden,), (s.d_model,), ("mlp",), ("embed",), **lin)

    def __call__(self, x, last=None, keep=None):
        prev, last = token_shift(x, last, keep)
        h = jax.nn.relu(self.key(x + (prev - x) * self.mu_k[...].astype(x.dtype)))
        return self.value(h * h), last


def memory_flops_per_token(s: Settings, seq_len: int) -> float:
    """Forward FLOPs per token of `vector_chunked`, per layer (all heads), as XLA counts them. Per chunk
    of C tokens and head (N = Dk = Dv): the decay products G (a cumulative product down the columns of a
    [C, C] matrix per channel, which XLA lowers as a windowed reduction: C^3 N); four channel-weighted
    C x C products (the erase, the predictions' and the two reads' weights: an elementwise product and
    a contraction, 4 C^2 N each) and their four products with [C, N] right-hand sides (2 C^2 N each);
    the unit lower-triangular inverse (~2/3 C^3); the boundary reads of the predictions and queries and
    the two state terms (2 C N^2 each)."""
    c, n = min(s.chunk_size, seq_len), s.head_dim
    per_chunk = c**3 * n + 4 * 4 * c * c * n + 4 * 2 * c * c * n + (2 / 3) * c**3 + 4 * 2 * c * n * n
    return s.num_heads * per_chunk / c
