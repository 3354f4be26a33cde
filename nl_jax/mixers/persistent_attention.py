"""Titans' attention (Titans, Section 4): causal softmax attention whose keys are learnable
persistent tokens followed by the sequence's own keys, full or in a sliding window, with the forms
MAG / MAL (a whole sequence, decoding with a KV cache) and MAC (segments that also attend to the
memory's retrieval) need. The persistent tokens are projected by the attention's own W_K / W_V, take
no rotary position, and every query sees them. With segment ids, sequence keys are seen only within
the query's document and rotary positions count from the document's first token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers import apply_rope, logical_param, to_dtype
from nl_jax.layers.conv import document_starts
from nl_jax.mixers.attention import (
    Attention,
    KVCache,
    attention_dims,
    attention_mask,
    dot_product_attention,
    segment_mask,
)


def _starts(segment_ids):
    """bool [B, T]: a document's first token (the row's first included)."""
    return document_starts(segment_ids).at[:, 0].set(True)


class PersistentAttention(nnx.Module):
    """Causal softmax attention (the shared `Attention` projections) over learnable persistent tokens
    followed by the sequence's keys; `window` > 0 limits the sequence keys to a sliding window."""

    def __init__(self, cfg, window: int, *, rngs: nnx.Rngs):
        if cfg.get("attention_impl", "xla") != "xla":
            raise ValueError(
                "titans attends over its persistent tokens with the einsum form: set attention_impl='xla' "
                "(the fused kernels serve transformer, hope_attention and samba)"
            )
        heads, kv, head_dim = attention_dims(cfg)
        kw = dict(
            init_std=cfg.init_std, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs
        )
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

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """Sliding-window (or full) causal attention over a whole sequence x [B, T, d_model];
        `segment_ids` [B, T]: sequence keys of the query's document only."""
        pos = jnp.arange(x.shape[1])
        # Rotary positions count from each document's first token: the persistent keys carry none,
        # so the scores are not shift-invariant and a document must see the positions it has alone.
        rope = pos
        if segment_ids is not None:
            rope = pos - jax.lax.cummax(jnp.where(_starts(segment_ids), pos, 0), axis=1)
        q, k, v = self._qkv(x, x, rope, rope)
        if self.window and x.shape[1] > 2 * self.window:
            return self._blocked(q, k, v, segment_ids)  # O(T W), not O(T^2)
        mask = attention_mask(pos, pos, self.window)
        if segment_ids is not None:
            mask = mask & segment_mask(segment_ids, segment_ids)
        return self.attend(q, k, v, mask)

    def _blocked(self, q, k, v, segment_ids=None):
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
        mask = jnp.broadcast_to(mask, (b, *mask.shape))
        if segment_ids is not None:  # keys before the row (block -1) and padding are hidden by position
            sb = jnp.pad(segment_ids, ((0, 0), (0, n * w - t))).reshape(b, n, w)
            sk = jnp.concatenate([jnp.pad(sb, ((0, 0), (1, 0), (0, 0)))[:, :-1], sb], axis=2)
            mask = mask & (sb[..., :, None] == sk[..., None, :])
        fold = lambda x: x.reshape(b * n, *x.shape[2:])  # noqa: E731  (blocks into the batch)
        y = self.attend(fold(qb), fold(kb), fold(vb), fold(mask))
        return y.reshape(b, n * w, -1)[:, :t]

    def init_cache(self, batch_size: int, max_len: int | None = None, documents: bool = False) -> KVCache:
        return self.attn.init_cache(batch_size, max_len, documents)

    def decode(
        self, x: jax.Array, cache: KVCache, segment_ids=None, document_pos=None
    ) -> tuple[jax.Array, KVCache]:
        """One token x [B, 1, d_model] against the cache (ring buffer under a window). Packed rows:
        `segment_ids` [B, 1] (a cache made with documents) hide other documents' slots, and
        `document_pos` [B] (the token's position in its document) is its rotary position, as in
        the training forward."""
        t = cache.pos
        rope = t[None] if document_pos is None else document_pos[:, None]
        q, k, v = self._qkv(x, x, rope, rope)
        size = cache.k.shape[1]
        kc = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), t % size, axis=1)
        vc = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), t % size, axis=1)
        slot_pos = t - (t - jnp.arange(size)) % size  # newest position in each slot (< 0: empty)
        mask = attention_mask(t[None], slot_pos, self.window)
        segments = cache.segments
        if segment_ids is not None:
            segments = jax.lax.dynamic_update_slice_in_dim(segments, segment_ids, t % size, axis=1)
            mask = mask & segment_mask(segment_ids, segments)
        y = self.attend(q, kc.astype(q.dtype), vc.astype(q.dtype), mask)
        return y, KVCache(kc, vc, t + 1, segments)

    # MAC: attention inside one segment of S tokens over [retrieved || segment].

    def segment(self, r: jax.Array, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """r, x [B, S, d_model] -> [B, S, d_model]; query j (at position S + j) sees r_i and x_i
        (positions i and S + i) for i <= j; with `segment_ids` [B, S] only for i in j's document
        (r_i is token i's retrieval, so it belongs to token i's document)."""
        s = x.shape[1]
        idx = jnp.arange(s)
        q, k, v = self._qkv(x, jnp.concatenate([r, x], axis=1), s + idx, jnp.arange(2 * s))
        tril = idx[None, :] <= idx[:, None]
        mask = jnp.concatenate([tril, tril], axis=1)
        if segment_ids is not None:
            mask = mask & segment_mask(segment_ids, jnp.concatenate([segment_ids, segment_ids], axis=1))
        return self.attend(q, k, v, mask)

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
