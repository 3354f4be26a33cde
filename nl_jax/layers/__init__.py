"""Small flax.nnx building blocks shared by every model: embeddings, norms, attention, MLPs, convs.

Every parameter carries logical axis names (`out_sharding` metadata, e.g. ('embed', 'mlp')) that
`nl_jax.parallel.rules` maps to mesh axes; none of these modules needs a mesh to be built.
"""

from nl_jax.layers.attention import (
    Attention,
    KVCache,
    attention_dims,
    attention_mask,
    dot_product_attention,
    local_attention,
    segment_mask,
)
from nl_jax.layers.conv import ShortConv
from nl_jax.layers.embed import Embed, Unembed
from nl_jax.layers.linear import Linear, logical_param, to_dtype
from nl_jax.layers.mlp import SwiGLU
from nl_jax.layers.norms import RMSNorm
from nl_jax.layers.rotary import apply_rope

__all__ = [
    "Attention",
    "KVCache",
    "attention_dims",
    "dot_product_attention",
    "attention_mask",
    "local_attention",
    "segment_mask",
    "ShortConv",
    "Embed",
    "Unembed",
    "Linear",
    "logical_param",
    "to_dtype",
    "SwiGLU",
    "RMSNorm",
    "apply_rope",
]
