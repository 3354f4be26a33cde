"""Causal multi-head softmax attention: full or sliding window, RoPE, GQA, no biases, KV cache.

Sliding window W means each query sees itself and the W-1 tokens before it (W keys in total).
One einsum implementation with an explicit boolean mask serves training and decoding, so the
decode path is the training path applied to a cache (checked against each other in the tests).
Long sliding-window sequences take a blocked path (local_attention) tested against it.
Optional segment ids (the document of each token of a packed row, nl_jax/data/packing.py) hide
keys of other documents from a query, on both paths.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers.linear import Linear, to_dtype
from nl_jax.layers.rotary import apply_rope
from nl_jax.mixers.attention_kernels import check_impl, fused_attention


def head_dim_of(cfg) -> int:
    """A model config's per-head width: `head_dim`, or d_model // num_heads when it is 0."""
    head_dim = cfg.get("head_dim", 0)
    if not head_dim:
        if cfg.d_model % cfg.num_heads:
            raise ValueError(
                f"d_model={cfg.d_model} is not divisible by num_heads={cfg.num_heads}; set head_dim explicitly"
            )
        head_dim = cfg.d_model // cfg.num_heads
    return head_dim


def attention_dims(cfg) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of a model config, with the 0 = default conventions resolved."""
    heads = cfg.num_heads
    return heads, cfg.get("num_kv_heads", 0) or heads, head_dim_of(cfg)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int = 0) -> jax.Array:
    """bool [Tq, Tk]: key j visible to query i iff 0 <= k_pos[j] <= q_pos[i] (and within the window).

    Negative key positions mark empty cache slots.
    """
    q, k = q_pos[:, None], k_pos[None, :]
    mask = (k <= q) & (k >= 0)
    if window:
        mask &= k > q - window
    return mask


def segment_mask(q_segments: jax.Array, k_segments: jax.Array) -> jax.Array:
    """bool [B, Tq, Tk]: key j visible to query i only within the same document (equal segment ids)."""
    return q_segments[:, :, None] == k_segments[:, None, :]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, T, H, D], k / v [B, S, KVH, D] with H % KVH == 0 (GQA), mask bool [T, S] or [B, T, S].

    Logits and softmax in float32; returns [B, T, H, D] in q's dtype. Heads go first and the query
    heads that share a kv head are rows of one product ([B, KVH, G x T, D] against [B, KVH, S, D]):
    the layout the CPU's matmuls take for every product of the forward and the backward, where
    token-major scores had the backward transpose them.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    if h % kvh:
        raise ValueError(f"num_heads={h} is not a multiple of num_kv_heads={kvh}")
    g = h // kvh
    rows = jnp.moveaxis(q.reshape(b, t, kvh, g, d), 1, 3).reshape(b, kvh, g * t, d)
    kh, vh = (jnp.moveaxis(x, 1, 2) for x in (k, v))  # [B, KVH, S, D]
    logits = jnp.einsum("bkrd,bksd->bkrs", rows, kh, preferred_element_type=jnp.float32) * d**-0.5
    mask = mask if mask.ndim == 3 else mask[None]
    mask = jnp.broadcast_to(mask[:, None], (mask.shape[0], g, t, mask.shape[-1]))
    logits = jnp.where(mask.reshape(-1, 1, g * t, mask.shape[-1]), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkrs,bksd->bkrd", probs, vh).reshape(b, kvh, g, t, d)
    return jnp.moveaxis(out, 3, 1).reshape(b, t, h, d)


CAUSAL_BLOCK = 64  # smallest query block of `causal_attention`; at most CAUSAL_BLOCKS blocks
CAUSAL_BLOCKS = 16


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None
) -> jax.Array:
    """Full causal attention by blocks of queries, each against the keys up to its last query: the
    same result as dot_product_attention with attention_mask(pos, pos) (and segment_mask when
    `segment_ids` [B, T] are given), without the key blocks the causal mask hides entirely.

    n blocks compute (n + 1) / 2n of the [T, T] scores; blocks of max(64, T / 16) queries keep the
    blocks few. Its gradient against the single einsum on the CPU (`python -m benchmarks.attention`):
    1.8x at 4 x 256, 1.8x at 8 x 256, 2.6x at 1 x 2048, 4 heads of 32. `Attention` runs it on the
    CPU only (not timed on an accelerator). Shapes as in dot_product_attention."""
    t = q.shape[1]
    block = max(CAUSAL_BLOCK, -(-t // CAUSAL_BLOCKS))
    pos = jnp.arange(t)
    out = []
    for start in range(0, t, block):
        end = min(start + block, t)
        mask = attention_mask(pos[start:end], pos[:end])
        if segment_ids is not None:
            mask = mask & segment_mask(segment_ids[:, start:end], segment_ids[:, :end])
        out.append(dot_product_attention(q[:, start:end], k[:, :end], v[:, :end], mask))
    return jnp.concatenate(out, axis=1)


def local_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, window: int, segment_ids: jax.Array | None = None
) -> jax.Array:
    """Sliding-window causal attention in O(T * 2W) instead of O(T^2): same result as
    dot_product_attention with attention_mask(pos, pos, window) (and segment_mask when
    `segment_ids` [B, T] are given).

    The sequence is cut into blocks of W queries; a block's keys are itself and the block before,
    which covers every window that ends inside it. Shapes as in dot_product_attention.
    """
    b, t, h, d = q.shape
    n = -(-t // window)  # number of blocks
    pad = n * window - t  # padded keys sit after every real query, so the mask hides them

    def blocks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((b, n, window) + x.shape[2:])

    def with_previous(x):
        """[B, n, W, ...] -> [B, n, 2W, ...]: each block's keys after those of the block before."""
        prev = jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))[:, :-1]
        return jnp.concatenate([prev, x], axis=2)

    qb, kb, vb = blocks(q), with_previous(blocks(k)), with_previous(blocks(v))  # kb, vb [B, n, 2W, KVH, D]
    q_pos = jnp.arange(window)[None] + window * jnp.arange(n)[:, None]  # [n, W]
    k_pos = jnp.arange(-window, window)[None] + window * jnp.arange(n)[:, None]  # [n, 2W]
    mask = jax.vmap(attention_mask, in_axes=(0, 0, None))(q_pos, k_pos, window)  # [n, W, 2W]
    mask = jnp.broadcast_to(mask, (b,) + mask.shape)
    if segment_ids is not None:
        seg = blocks(segment_ids)  # [B, n, W]; keys before the row (block -1) are hidden by position
        mask &= jax.vmap(segment_mask, in_axes=1, out_axes=1)(seg, with_previous(seg))
    # Fold blocks into the batch: each block is an independent small attention.
    fold = lambda x: x.reshape((b * n,) + x.shape[2:])
    out = dot_product_attention(fold(qb), fold(kb), fold(vb), fold(mask))
    return out.reshape(b, n * window, h, d)[:, :t]


class KVCache(NamedTuple):
    """Per-layer decode state. Slot s holds the newest position p <= pos with p % S == s.

    S = max_len for full attention; S = window for sliding-window attention (a ring buffer, so
    memory stays constant however long the stream runs).
    """

    k: jax.Array  # [B, S, KVH, D], RoPE already applied
    v: jax.Array  # [B, S, KVH, D]
    pos: jax.Array  # int32 []: position of the next token
    # int32 [B, S]: the document (segment id) of each slot's token, for decoding packed rows; None
    # in a cache made without `documents`
    segments: jax.Array | None = None


class Attention(nnx.Module):
    @classmethod
    def from_config(cls, cfg, **kw) -> "Attention":
        """The attention of a `model` config section: head counts (`attention_dims`), rotary base,
        window and kernel (`attention_impl`); `kw`: init_std, dtype, param_dtype, rngs."""
        heads, kv, head_dim = attention_dims(cfg)
        return cls(
            cfg.d_model,
            heads,
            kv,
            head_dim,
            rope_theta=cfg.rope_theta,
            sliding_window=cfg.sliding_window,
            impl=cfg.get("attention_impl", "xla"),  # configs saved before the field existed
            **kw,
        )

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        rope_theta: float = 10000.0,
        sliding_window: int = 0,
        impl: str = "xla",
        init_std: float = 0.02,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_impl(impl)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta, self.sliding_window, self.impl = rope_theta, sliding_window, impl
        self.dtype = to_dtype(dtype)
        kw = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = Linear((d_model,), (num_heads, head_dim), ("embed",), ("heads", "head_dim"), **kw)
        kv_names = ("kv_heads", "head_dim")
        self.k = Linear((d_model,), (num_kv_heads, head_dim), ("embed",), kv_names, **kw)
        self.v = Linear((d_model,), (num_kv_heads, head_dim), ("embed",), kv_names, **kw)
        self.o = Linear((num_heads, head_dim), (d_model,), ("heads", "head_dim"), ("embed",), **kw)

    def _qkv(self, x, positions):
        q = apply_rope(self.q(x), positions, self.rope_theta)
        k = apply_rope(self.k(x), positions, self.rope_theta)
        return q, k, self.v(x)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """Training / prefill over a whole sequence: x [B, T, d_model] -> [B, T, d_model].

        `segment_ids` int32 [B, T] (optional): queries see only keys of their own document.
        `impl` other than "xla" runs a fused kernel (nl_jax/mixers/attention_kernels.py)."""
        pos = jnp.arange(x.shape[1])
        q, k, v = self._qkv(x, pos)
        if self.impl != "xla":
            return self.o(fused_attention(q, k, v, segment_ids, window=self.sliding_window, impl=self.impl))
        if self.sliding_window and x.shape[1] > 2 * self.sliding_window:
            # O(T W), not O(T^2)
            return self.o(local_attention(q, k, v, self.sliding_window, segment_ids))
        mask = attention_mask(pos, pos, self.sliding_window)
        if segment_ids is not None:
            mask = mask & segment_mask(segment_ids, segment_ids)
        if self.sliding_window:
            return self.o(dot_product_attention(q, k, v, mask))
        # By blocks on the CPU, where it was measured; accelerators keep one einsum (their fused
        # kernels are `impl`), chosen at lowering, so a TPU program compiled from a CPU host keeps it.
        out = jax.lax.platform_dependent(
            q,
            k,
            v,
            cpu=lambda q, k, v: causal_attention(q, k, v, segment_ids),
            default=lambda q, k, v: dot_product_attention(q, k, v, mask),
        )
        return self.o(out)

    def init_cache(self, batch_size: int, max_len: int | None = None, documents: bool = False) -> KVCache:
        """Empty cache. Full attention needs max_len (the longest stream to decode); a sliding window
        needs only its window. Past max_len a full cache wraps and behaves as a window of max_len.
        `documents`: the cache also keeps each slot's segment id (`decode` with segment ids)."""
        if self.sliding_window and (max_len is None or max_len > self.sliding_window):
            size = self.sliding_window
        elif max_len is None:
            raise ValueError("full-attention decoding needs max_len (the cache length)")
        else:
            size = max_len
        shape = (batch_size, size, self.num_kv_heads, self.head_dim)
        segments = jnp.zeros((batch_size, size), jnp.int32) if documents else None
        return KVCache(
            jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype), jnp.zeros((), jnp.int32), segments
        )

    def decode(
        self, x: jax.Array, cache: KVCache, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, KVCache]:
        """One token per sequence: x [B, 1, d_model] -> (y [B, 1, d_model], updated cache).

        `segment_ids` int32 [B, 1] (a cache made with `documents`): the token's document; it sees
        only cached keys of that document, as in the training forward with the row's segment ids."""
        if x.shape[1] != 1:
            raise ValueError(f"decode takes one token at a time, got length {x.shape[1]}")
        t = cache.pos
        q, k, v = self._qkv(x, t[None])
        size = cache.k.shape[1]
        slot = t % size
        kc = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), slot, axis=1)
        vc = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), slot, axis=1)
        slot_pos = t - (t - jnp.arange(size)) % size  # newest position stored in each slot (< 0: empty)
        mask = attention_mask(t[None], slot_pos, self.sliding_window)
        segments = cache.segments
        if segment_ids is not None:
            if segments is None:
                raise ValueError(
                    "decoding with segment ids needs a cache that keeps them: "
                    "init_decode_state(batch_size, max_len, documents=True)"
                )
            ids = segment_ids.astype(jnp.int32)
            segments = jax.lax.dynamic_update_slice_in_dim(segments, ids, slot, axis=1)
            mask = mask & segment_mask(segment_ids, segments)
        y = self.o(dot_product_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), mask))
        return y, KVCache(kc, vc, t + 1, segments)

    def extend(
        self,
        x: jax.Array,
        cache: KVCache,
        segment_ids: jax.Array | None = None,
        cached_segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """A segment of T tokens against the cache (prefill / chunked decoding): x [B, T, d_model] ->
        (y [B, T, d_model], cache holding the segment too). Equals T calls of `decode`.

        Queries see the cached keys and the segment's own keys (causally), so a ring buffer shorter
        than the segment still gives every query its full window; then the newest min(T, S) keys
        are written into their slots.

        `segment_ids` [B, T] with `cached_segment_ids` [B, P] (the ids of positions 0..P-1, P at
        least the cache's position: a row run segment by segment from its start): queries see only
        keys, cached or not, of their own document.
        """
        t0, t = cache.pos, x.shape[1]
        pos = t0 + jnp.arange(t)
        q, k, v = self._qkv(x, pos)
        size = cache.k.shape[1]
        cached_pos = (t0 - 1) - (
            t0 - 1 - jnp.arange(size)
        ) % size  # newest position < t0 per slot (< 0: empty)
        keys = jnp.concatenate([cache.k.astype(q.dtype), k], axis=1)
        values = jnp.concatenate([cache.v.astype(q.dtype), v], axis=1)
        mask = attention_mask(pos, jnp.concatenate([cached_pos, pos]), self.sliding_window)
        if segment_ids is not None:  # empty slots (position < 0) are hidden by position already
            cached_ids = jnp.take(cached_segment_ids, jnp.maximum(cached_pos, 0), axis=1)
            mask = mask & segment_mask(segment_ids, jnp.concatenate([cached_ids, segment_ids], axis=1))
        y = self.o(dot_product_attention(q, keys, values, mask))
        m = min(t, size)
        slots = (t0 + t - m + jnp.arange(m)) % size
        kc = cache.k.at[:, slots].set(k[:, t - m :].astype(cache.k.dtype))
        vc = cache.v.at[:, slots].set(v[:, t - m :].astype(cache.v.dtype))
        return y, KVCache(kc, vc, t0 + t)
