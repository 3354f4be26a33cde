"""Gated MLP: SwiGLU (Shazeer 2020), down(silu(gate(x)) * up(x)), no biases."""

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers.linear import Linear


class SwiGLU(nnx.Module):
    def __init__(
        self,
        d_model: int,
        hidden: int,
        *,
        init_std: float = 0.02,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = Linear((d_model,), (hidden,), ("embed",), ("mlp",), **kw)
        self.up = Linear((d_model,), (hidden,), ("embed",), ("mlp",), **kw)
        self.down = Linear((hidden,), (d_model,), ("mlp",), ("embed",), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
