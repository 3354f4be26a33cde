"""Titans (Behrouz et al. 2025): the neural long-term memory alone (LMM) and its three hybrids with
attention, MAC, MAG and MAL (Titans, Sections 3-4). One registered model, `titans`; the variant is
`model.titans.variant`. Every block is pre-norm with residuals and ends in a SwiGLU MLP:

  lmm  h = x + LMM(Norm(x))
  mac  per segment of `segment_size` tokens, with xn = Norm(x) and M the memory at the segment start:
         r = M(q(xn))                              retrieve: one memory token per segment token
         y = Attn(xn | keys [persistent || r || xn])   causal inside the segment (query j sees r_i, xn_i
                                                   for i <= j, and every persistent token)
         m = LMM(Norm(y))                          the memory learns from y (its update) and reads M*(y)
         h = x + W_o(Norm(y) * sigmoid(Norm(m)))   the paper's y (x) M*(y)
  mag  h = x + W_o(Norm(a) * sigmoid(Norm(m)))  with a = SWA(xn | [persistent || xn]), m = LMM(xn)
  mal  g = x + LMM(Norm(x));  h = g + SWA(Norm(g) | [persistent || Norm(g)])
  all  y = h + SwiGLU(Norm(h))

LMM is `nl_jax.memory.titans.NeuralMemory` (its own output norm and SiLU gate, Titans 4.4).
Persistent memory: `persistent_tokens` learnable vectors prepended to the attention input; they are
projected by the attention's own W_K / W_V, take no rotary position, and every query sees them (also
past the sliding window). MAC's segments double as its attention span, so its attention costs
O(T * segment) and its decode cache holds one segment.

Config: the Transformer++ fields (vocab_size, d_model, num_layers, num_heads, num_kv_heads, head_dim,
mlp_hidden, rope_theta, sliding_window (MAG / MAL attention window; 0 = full causal), tie_embeddings,
norm_eps, dtype, param_dtype, scan_layers, remat_policy, init_std) plus a `titans` section, see
experiments/configs/titans_base.py: variant, segment_size, persistent_tokens and `memory` (num_heads,
head_dim, structure, hidden, activation, chunk_size, read, momentum, max_lr, conv_width,
remat_chunks, form).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers import (
    Attention,
    KVCache,
    Linear,
    RMSNorm,
    SwiGLU,
    apply_rope,
    attention_dims,
    attention_mask,
    dot_product_attention,
    logical_param,
    to_dtype,
)
from nl_jax.memory import ops
from nl_jax.memory.titans import NeuralMemory, NeuralMemoryState
from nl_jax.models.lm import RESIDUAL, CausalLM
from nl_jax.models.registry import register
from nl_jax.parallel.rules import constrain

VARIANTS = ("lmm", "mac", "mag", "mal")


def check_variant(cfg) -> str:
    variant = cfg.titans.variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown titans variant {variant!r}; choose one of {VARIANTS}")
    return variant


def memory_dims(cfg) -> tuple[int, int, int]:
    """(heads, head_dim, hidden) of the neural memory, with the 0 = default conventions resolved."""
    mem = cfg.titans.memory
    heads = mem.num_heads or cfg.num_heads
    head_dim = mem.head_dim or cfg.d_model // heads
    return heads, head_dim, mem.hidden or head_dim


def _kw(cfg, rngs):
    return dict(
        init_std=cfg.init_std, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs
    )


def _norm(cfg, dim=None):
    return RMSNorm(dim or cfg.d_model, eps=cfg.norm_eps, param_dtype=to_dtype(cfg.param_dtype))


def _memory(cfg, rngs) -> NeuralMemory:
    mem = cfg.titans.memory
    heads, head_dim, hidden = memory_dims(cfg)
    return NeuralMemory(
        cfg.d_model,
        heads,
        head_dim,
        structure=mem.structure,
        hidden=hidden,
        activation=mem.activation,
        chunk_size=mem.chunk_size,
        read=mem.read,
        momentum=mem.momentum,
        max_lr=mem.max_lr,
        conv_width=mem.conv_width,
        remat_chunks=mem.remat_chunks,
        form=mem.form,
        **_kw(cfg, rngs),
    )


class PersistentAttention(nnx.Module):
    """Causal softmax attention (the shared `Attention` projections) over learnable persistent tokens
    followed by the sequence's keys; `window` > 0 limits the sequence keys to a sliding window."""

    def __init__(self, cfg, window: int, *, rngs: nnx.Rngs):
        heads, kv, head_dim = attention_dims(cfg)
        kw = _kw(cfg, rngs)
        self.rope_theta, self.window = cfg.rope_theta, window
        self.attn = Attention(
            cfg.d_model, heads, kv, head_dim, rope_theta=cfg.rope_theta, sliding_window=window, **kw
        )
        n = cfg.titans.persistent_tokens
        # They join a normalised input, hence unit scale.
        self.persistent = (
            logical_param(
                rngs, jax.nn.initializers.normal(1.0), (n, cfg.d_model), (None, "embed"), kw["param_dtype"]
            )
            if n
            else None
        )

    def _persistent_kv(self, batch: int):
        if self.persistent is None:
            return None
        p = self.persistent[...]
        kp, vp = self.attn.k(p), self.attn.v(p)  # [Np, KVH, D], no rotary: position-free
        return tuple(jnp.broadcast_to(z, (batch, *z.shape)) for z in (kp, vp))

    def attend(self, q, k, v, mask):
        """q [B, T, H, D] against [persistent || k] (k, v [B, S, KVH, D]); mask [T, S] or [B, T, S]
        covers the sequence keys only. Returns the output projection [B, T, d_model]."""
        b = q.shape[0]
        pkv = self._persistent_kv(b)
        if pkv is not None:
            k = jnp.concatenate([pkv[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([pkv[1].astype(v.dtype), v], axis=1)
            mask = mask if mask.ndim == 3 else jnp.broadcast_to(mask, (b, *mask.shape))
            seen = jnp.ones((*mask.shape[:2], pkv[0].shape[1]), bool)
            mask = jnp.concatenate([seen, mask], axis=-1)
        return self.attn.o(dot_product_attention(q, k, v, mask))

    def _qkv(self, xq, xkv, q_pos, k_pos):
        q = apply_rope(self.attn.q(xq), q_pos, self.rope_theta)
        k = apply_rope(self.attn.k(xkv), k_pos, self.rope_theta)
        return q, k, self.attn.v(xkv)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Sliding-window (or full) causal attention over a whole sequence x [B, T, d_model]."""
        pos = jnp.arange(x.shape[1])
        q, k, v = self._qkv(x, x, pos, pos)
        if self.window and x.shape[1] > 2 * self.window:
            return self._blocked(q, k, v)  # O(T W), not O(T^2)
        return self.attend(q, k, v, attention_mask(pos, pos, self.window))

    def _blocked(self, q, k, v):
        """Sliding-window attention in blocks of W queries against the block before and their own
        (as layers.local_attention), every block also seeing the persistent tokens."""
        b, t = q.shape[:2]
        w = self.window
        n = -(-t // w)  # number of blocks; padded keys sit after every real query, so the mask hides them

        def blocks(x):
            x = jnp.pad(x, ((0, 0), (0, n * w - t), (0, 0), (0, 0)))
            return x.reshape(b, n, w, *x.shape[2:])

        prev = lambda x: jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :-1]  # noqa: E731
        qb, kb, vb = blocks(q), blocks(k), blocks(v)
        kb, vb = (jnp.concatenate([prev(z), z], axis=2) for z in (kb, vb))  # [B, n, 2W, KVH, D]
        q_pos = jnp.arange(w)[None] + w * jnp.arange(n)[:, None]  # [n, W]
        k_pos = jnp.arange(-w, w)[None] + w * jnp.arange(n)[:, None]  # [n, 2W]
        mask = jax.vmap(attention_mask, in_axes=(0, 0, None))(q_pos, k_pos, w)  # [n, W, 2W]
        fold = lambda x: x.reshape(b * n, *x.shape[2:])  # noqa: E731  (blocks into the batch)
        y = self.attend(fold(qb), fold(kb), fold(vb), jnp.tile(mask, (b, 1, 1)))
        return y.reshape(b, n * w, -1)[:, :t]

    def init_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return self.attn.init_cache(batch_size, max_len)

    def decode(self, x: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One token x [B, 1, d_model] against the cache (ring buffer under a window)."""
        t = cache.pos
        q, k, v = self._qkv(x, x, t[None], t[None])
        size = cache.k.shape[1]
        kc = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), t % size, axis=1)
        vc = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), t % size, axis=1)
        slot_pos = t - (t - jnp.arange(size)) % size  # newest position in each slot (< 0: empty)
        y = self.attend(
            q, kc.astype(q.dtype), vc.astype(q.dtype), attention_mask(t[None], slot_pos, self.window)
        )
        return y, KVCache(kc, vc, t + 1)

    # MAC: attention inside one segment of S tokens over [retrieved || segment].

    def segment(self, r: jax.Array, x: jax.Array) -> jax.Array:
        """r, x [B, S, d_model] -> [B, S, d_model]; query j (at position S + j) sees r_i and x_i
        (positions i and S + i) for i <= j."""
        s = x.shape[1]
        idx = jnp.arange(s)
        q, k, v = self._qkv(x, jnp.concatenate([r, x], axis=1), s + idx, jnp.arange(2 * s))
        tril = idx[None, :] <= idx[:, None]
        return self.attend(q, k, v, jnp.concatenate([tril, tril], axis=1))

    def init_segment_cache(self, batch_size: int, segment_size: int) -> KVCache:
        """Keys / values of the current segment: slot i holds r_i, slot S + i holds x_i."""
        return self.attn.init_cache(batch_size, 2 * segment_size)

    def segment_decode(self, r, x, cache: KVCache, j) -> tuple[jax.Array, KVCache]:
        """One token: r, x [B, 1, d_model] at index j of its segment -> (y [B, 1, d_model], cache)."""
        s = cache.k.shape[1] // 2
        pos = jnp.stack([j, s + j])
        q, k, v = self._qkv(x, jnp.concatenate([r, x], axis=1), pos[1:], pos)
        kc, vc = cache.k, cache.v
        for i in range(2):  # slots j and S + j
            kc = jax.lax.dynamic_update_slice_in_dim(kc, k[:, i : i + 1].astype(kc.dtype), pos[i], axis=1)
            vc = jax.lax.dynamic_update_slice_in_dim(vc, v[:, i : i + 1].astype(vc.dtype), pos[i], axis=1)
        seen = (jnp.arange(2 * s) % s <= j)[None]  # slots beyond j hold the previous segment: hidden
        y = self.attend(q, kc.astype(q.dtype), vc.astype(q.dtype), seen)
        return y, KVCache(kc, vc, cache.pos + 1)


class _MLPOut(nnx.Module):
    """y = h + SwiGLU(Norm(h)), the second half of every block."""

    def __init__(self, cfg, *, rngs):
        self.mlp_norm = _norm(cfg)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, **_kw(cfg, rngs))

    def __call__(self, h):
        return constrain(h + self.mlp(self.mlp_norm(h)), RESIDUAL)


class _Gate(nnx.Module):
    """W_o(Norm(y) * sigmoid(Norm(m))): the MAC / MAG combination of attention and memory outputs
    (learnable vector-valued normalisation, then a non-linearity on the memory branch)."""

    def __init__(self, cfg, *, rngs):
        self.y_norm, self.m_norm = _norm(cfg), _norm(cfg)
        self.out = Linear((cfg.d_model,), (cfg.d_model,), ("embed",), ("embed",), **_kw(cfg, rngs))

    def __call__(self, y, m):
        return self.out(self.y_norm(y) * jax.nn.sigmoid(self.m_norm(m)))


class LMMBlock(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.mem_norm, self.memory = _norm(cfg), _memory(cfg, rngs)
        self.out = _MLPOut(cfg, rngs=rngs)

    def init_state(self, batch_size: int, max_len: int | None = None):
        return self.memory.init_state(batch_size)

    def __call__(self, x, state=None):
        m, state = self.memory(self.mem_norm(x), state)
        return self.out(x + m), state


class MAGBlock(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.norm, self.memory = _norm(cfg), _memory(cfg, rngs)
        self.attn = PersistentAttention(cfg, cfg.sliding_window, rngs=rngs)
        self.gate, self.out = _Gate(cfg, rngs=rngs), _MLPOut(cfg, rngs=rngs)

    def init_state(self, batch_size: int, max_len: int | None = None):
        return self.attn.init_cache(batch_size, max_len), self.memory.init_state(batch_size)

    def __call__(self, x, state=None):
        xn = self.norm(x)
        if state is None:
            a, (m, _) = self.attn(xn), self.memory(xn)
        else:
            a, cache = self.attn.decode(xn, state[0])
            m, mem = self.memory(xn, state[1])
            state = (cache, mem)
        return self.out(x + self.gate(a, m)), state


class MALBlock(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.mem_norm, self.memory = _norm(cfg), _memory(cfg, rngs)
        self.attn_norm = _norm(cfg)
        self.attn = PersistentAttention(cfg, cfg.sliding_window, rngs=rngs)
        self.out = _MLPOut(cfg, rngs=rngs)

    def init_state(self, batch_size: int, max_len: int | None = None):
        return self.attn.init_cache(batch_size, max_len), self.memory.init_state(batch_size)

    def __call__(self, x, state=None):
        if state is None:
            g = x + self.memory(self.mem_norm(x))[0]
            return self.out(g + self.attn(self.attn_norm(g))), None
        m, mem = self.memory(self.mem_norm(x), state[1])
        g = x + m
        a, cache = self.attn.decode(self.attn_norm(g), state[0])
        return self.out(g + a), (cache, mem)


class MACState(NamedTuple):
    """Decode state of one MAC layer."""

    memory: NeuralMemoryState
    segment_weights: ops.MLPWeights | ops.LinearWeights  # the memory at the start of the segment
    cache: KVCache  # keys / values of the current segment (retrieved tokens and inputs)


class MACBlock(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.segment_size = cfg.titans.segment_size
        chunk = cfg.titans.memory.chunk_size
        if self.segment_size % chunk:
            raise ValueError(
                f"titans segment_size {self.segment_size} must be a multiple of the memory chunk_size {chunk}"
            )
        kw = _kw(cfg, rngs)
        heads, head_dim, _ = memory_dims(cfg)
        self.norm, self.memory = _norm(cfg), _memory(cfg, rngs)
        self.mem_norm = _norm(cfg)  # the memory learns from Norm(y): bounded inputs keep its inner GD stable
        # Retrieval r = M(q): its own query projection and output map (norm per head, then W).
        self.retrieve_q = Linear((cfg.d_model,), (heads, head_dim), ("embed",), ("heads", "head_dim"), **kw)
        self.retrieve_norm = RMSNorm(head_dim, names=("head_dim",), param_dtype=kw["param_dtype"])
        self.retrieve_out = Linear((heads, head_dim), (cfg.d_model,), ("heads", "head_dim"), ("embed",), **kw)
        self.attn = PersistentAttention(cfg, 0, rngs=rngs)
        self.gate, self.out = _Gate(cfg, rngs=rngs), _MLPOut(cfg, rngs=rngs)

    def _retrieve(self, x, weights):
        """x [B, S, d_model], memory weights [B, H, O, I] -> r [B, S, d_model] (no update)."""
        q = jax.nn.silu(self.retrieve_q(x)).astype(jnp.float32)
        q = q * jax.lax.rsqrt(jnp.sum(q * q, axis=-1, keepdims=True) + 1e-6)
        r = ops.apply(self.memory.spec, weights, jnp.swapaxes(q, 1, 2))  # [B, H, S, D]
        return self.retrieve_out(self.retrieve_norm(jnp.swapaxes(r, 1, 2).astype(x.dtype)))

    def init_state(self, batch_size: int, max_len: int | None = None) -> MACState:
        mem = self.memory.init_state(batch_size)
        return MACState(mem, mem.memory.weights, self.attn.init_segment_cache(batch_size, self.segment_size))

    def __call__(self, x, state: MACState | None = None):
        xn = self.norm(x)
        if state is None:
            y, m = self._segments(xn)
        else:
            j = state.cache.pos % self.segment_size
            start = j == 0  # the memory sits at a chunk boundary there: its weights start the segment
            seg_w = jax.tree.map(
                lambda a, b: jnp.where(start, a, b), state.memory.memory.weights, state.segment_weights
            )
            y, cache = self.attn.segment_decode(self._retrieve(xn, seg_w), xn, state.cache, j)
            m, mem = self.memory(self.mem_norm(y), state.memory)
            state = MACState(mem, seg_w, cache)
        return self.out(x + self.gate(y, m)), state

    def _segments(self, xn):
        b, t, d = xn.shape
        s = self.segment_size
        if t % s:
            raise ValueError(f"titans segment_size {s} does not divide the sequence length {t}")

        def body(mem, x_seg):
            y = self.attn.segment(self._retrieve(x_seg, mem.memory.weights), x_seg)
            m, mem = self.memory.forward(self.mem_norm(y), mem)  # the update learns from the attention output
            return mem, (y, m)

        segs = jnp.moveaxis(xn.reshape(b, t // s, s, d), 1, 0)
        _, (y, m) = jax.lax.scan(body, self.memory.init_state(b), segs)
        merge = lambda z: jnp.moveaxis(z, 0, 1).reshape(b, t, d)  # noqa: E731
        return merge(y), merge(m)


_BLOCKS = {"lmm": LMMBlock, "mac": MACBlock, "mag": MAGBlock, "mal": MALBlock}


@register("titans")
class Titans(CausalLM):
    """Titans LMM / MAC / MAG / MAL language model (`model.titans.variant`). Decoding MAG / MAL with
    full attention (sliding_window=0) needs max_len; each layer's memory starts from its own
    meta-learned initial weights."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        block = _BLOCKS[check_variant(cfg)]
        super().__init__(cfg, lambda r: block(cfg, rngs=r), rngs=rngs)

    @staticmethod
    def forward_flops_per_token(cfg, seq_len: int) -> float:
        """Forward matmul FLOPs per token, the memory's inner loop included (see memory_flops_per_token)."""
        return forward_flops_per_token(cfg, seq_len)


def memory_flops_per_token(cfg) -> float:
    """Inner-loop FLOPs of one neural memory per token (all heads), for the chunked training path.

    Per head and token, with M(z) = z + W1 s(W2 z) (widths D and Dh) and chunk C: the forward on the
    key at the boundary state (2 matmuls), the error back through W1, the rank-one gradients summed
    into both matrices, the read of the query at the boundary (2 matmuls), and for the in-chunk reads
    (per_token / post_update) the query-key and query-hidden scores against the C tokens of the
    chunk and the weighted sums of their errors. A linear memory has one D x D matrix.
    """
    mem = cfg.titans.memory
    heads, d, hid = memory_dims(cfg)
    c = mem.chunk_size
    in_chunk = mem.read != "boundary"
    if mem.structure == "linear":
        per_head = 2 * d * d * 3 + (4 * c * d if in_chunk else 0)
    else:
        mm = 2 * d * hid  # one matrix-vector product
        per_head = 2 * mm + mm + 2 * mm + 2 * mm + (2 * 2 * c * (d + hid) if in_chunk else 0)
    return float(heads * per_head)


def _memory_layer_flops(cfg) -> float:
    heads, d, _ = memory_dims(cfg)
    hd = heads * d
    proj = 2 * cfg.d_model * hd * 5 + 2 * cfg.d_model * heads * 3  # q k v gate out; three rates
    conv = 3 * 2 * cfg.titans.memory.conv_width * hd
    return proj + conv + memory_flops_per_token(cfg)


def forward_flops_per_token(cfg, seq_len: int) -> float:
    """Analytic forward FLOPs per token of the titans model for training sequences of seq_len."""
    variant = check_variant(cfg)
    d = cfg.d_model
    heads, kv, hd = attention_dims(cfg)
    n_p = cfg.titans.persistent_tokens
    layer = 2 * 3 * d * cfg.mlp_hidden + _memory_layer_flops(cfg)
    qo, kvp = 2 * 2 * d * heads * hd, 2 * 2 * d * kv * hd  # q and o, k and v projections of one token
    if variant in ("mag", "mal"):
        w = cfg.sliding_window or seq_len
        keys = sum(min(t + 1, w) for t in range(seq_len)) / seq_len + n_p  # visible keys, on average
        layer += qo + kvp + 2 * 2 * heads * hd * keys
    if variant == "mac":
        s = cfg.titans.segment_size
        mheads, md, hid = memory_dims(cfg)
        retrieve = 2 * d * mheads * md * 2 + mheads * (
            2 * 2 * md * (hid if cfg.titans.memory.structure == "mlp" else md)
        )
        keys = (s + 1) + n_p  # query j sees r_0..r_j, x_0..x_j and the persistent tokens
        layer += retrieve + qo + 2 * kvp + 2 * 2 * heads * hd * keys
    if variant in ("mac", "mag"):
        layer += 2 * d * d  # the gate's output projection
    return float(cfg.num_layers * layer + 2 * d * cfg.vocab_size)
