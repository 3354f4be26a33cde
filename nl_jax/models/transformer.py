"""Transformer++ baseline (Llama-style): pre-norm RMSNorm, RoPE attention, SwiGLU, no biases.

Config (`model` section, see experiments/configs/base.py): vocab_size, d_model, num_layers,
num_heads, num_kv_heads (0: = num_heads), head_dim (0: d_model // num_heads), mlp_hidden,
rope_theta, sliding_window (0: full attention), tie_embeddings, norm_eps, dtype, param_dtype,
scan_layers, remat_policy, init_std.
"""

import jax
from flax import nnx

from nl_jax.layers import Attention, Embed, RMSNorm, SwiGLU, Unembed, attention_dims, to_dtype
from nl_jax.models.registry import register
from nl_jax.models.stack import Stack
from nl_jax.parallel.rules import constrain

_RESIDUAL = ("batch", "length", "activation_embed")


class TransformerBlock(nnx.Module):
    """h = x + Attn(Norm(x)); y = h + MLP(Norm(h)). Block state: a KVCache when decoding."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        heads, kv, head_dim = attention_dims(cfg)
        kw = dict(
            init_std=cfg.init_std, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs
        )
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=kw["param_dtype"])
        self.attn = Attention(
            cfg.d_model,
            heads,
            kv,
            head_dim,
            rope_theta=cfg.rope_theta,
            sliding_window=cfg.sliding_window,
            **kw,
        )
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=kw["param_dtype"])
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, **kw)

    def init_state(self, batch_size: int, max_len: int | None = None):
        return self.attn.init_cache(batch_size, max_len)

    def __call__(self, x, state=None):
        if state is None:
            h = x + self.attn(self.attn_norm(x))
        else:
            a, state = self.attn.decode(self.attn_norm(x), state)
            h = x + a
        y = h + self.mlp(self.mlp_norm(h))
        return constrain(y, _RESIDUAL), state


@register("transformer")
class Transformer(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.vocab_size = cfg.vocab_size
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        self.embed = Embed(
            cfg.vocab_size,
            cfg.d_model,
            init_std=cfg.init_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.blocks = Stack(
            lambda r: TransformerBlock(cfg, rngs=r),
            cfg.num_layers,
            scan_layers=cfg.scan_layers,
            remat_policy=cfg.remat_policy,
            rngs=rngs,
        )
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.unembed = (
            None
            if cfg.tie_embeddings
            else Unembed(
                cfg.d_model,
                cfg.vocab_size,
                init_std=cfg.init_std,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        )

    def _logits(self, h):
        h = self.final_norm(h)
        return self.embed.attend(h) if self.unembed is None else self.unembed(h)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens int32 [B, T] -> logits float32 [B, T, vocab_size]."""
        h = constrain(self.embed(tokens), _RESIDUAL)
        h, _ = self.blocks(h)
        return self._logits(h)

    def init_decode_state(self, batch_size: int, max_len: int | None = None):
        """Stacked per-layer KV caches; max_len is required unless attention is sliding-window."""
        return self.blocks.init_state(batch_size, max_len)

    def decode_step(self, tokens: jax.Array, state):
        """tokens int32 [B] -> (logits float32 [B, V], new state)."""
        h = self.embed(tokens[:, None])
        h, state = self.blocks(h, state)
        return self._logits(h)[:, 0], state
