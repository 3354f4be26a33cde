"""Transformer++ baseline (Llama-style): pre-norm RMSNorm, RoPE attention, SwiGLU, no biases.

Config (`model` section, see experiments/configs/base.py): vocab_size, d_model, num_layers,
num_heads, num_kv_heads (0: = num_heads), head_dim (0: d_model // num_heads), mlp_hidden,
rope_theta, sliding_window (0: full attention), tie_embeddings, norm_eps, dtype, param_dtype,
scan_layers, remat_policy, init_std.

Packed rows: with segment ids attention stays within a document; attention is the only token mixer,
so that is both the "mask" and the "reset" of `data.document_boundaries`. Decoding a packed row
takes them too (`init_decode_state(..., documents=True)`, `decode_step(tokens, state, segment_ids)`):
the KV cache keeps each slot's document.
"""

from flax import nnx

from nl_jax.layers import RMSNorm, SwiGLU, to_dtype
from nl_jax.metrics.profiler import part
from nl_jax.mixers import Attention
from nl_jax.models.lm import RESIDUAL, CausalLM
from nl_jax.models.registry import register
from nl_jax.parallel.rules import constrain


class TransformerBlock(nnx.Module):
    """h = x + Attn(Norm(x)); y = h + MLP(Norm(h)). Block state: a KVCache when decoding."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        kw = dict(
            init_std=cfg.init_std, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs
        )
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=kw["param_dtype"])
        self.attn = Attention.from_config(cfg, **kw)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=kw["param_dtype"])
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, **kw)

    def init_state(self, batch_size: int, max_len: int | None = None, documents: bool = False):
        return self.attn.init_cache(batch_size, max_len, documents)

    def __call__(self, x, state=None, segment_ids=None):
        with part("mixer"):
            if state is None:
                h = x + self.attn(self.attn_norm(x), segment_ids)
            else:
                a, state = self.attn.decode(self.attn_norm(x), state, segment_ids)
                h = x + a
        with part("mlp"):
            y = h + self.mlp(self.mlp_norm(h))
        return constrain(y, RESIDUAL), state


@register("transformer")
class Transformer(CausalLM):
    document_boundaries = ("ignore", "mask", "reset")
    documents_in_decoding = "blocks"

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        super().__init__(cfg, lambda r: TransformerBlock(cfg, rngs=r), rngs=rngs)
