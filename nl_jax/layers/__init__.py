"""Small flax.nnx building blocks shared by every model: embeddings, norms, MLPs, convs, rotary
positions (token mixers, attention among them, are in `nl_jax.mixers`).

Every parameter carries logical axis names (`out_sharding` metadata, e.g. ('embed', 'mlp')) that
`nl_jax.parallel.rules` maps to mesh axes; none of these modules needs a mesh to be built.
"""

from nl_jax.layers.conv import ShortConv
from nl_jax.layers.embed import Embed, Unembed
from nl_jax.layers.linear import Linear, logical_param, to_dtype
from nl_jax.layers.mlp import SwiGLU
from nl_jax.layers.norms import LayerNorm, RMSNorm
from nl_jax.layers.rotary import apply_rope

__all__ = [
    "ShortConv",
    "Embed",
    "Unembed",
    "Linear",
    "logical_param",
    "to_dtype",
    "SwiGLU",
    "RMSNorm",
    "LayerNorm",
    "apply_rope",
]
