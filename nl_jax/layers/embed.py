"""Token embedding, with the tied unembedding (logits = x . E^T), and an untied unembedding."""

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers.linear import contract_trailing, logical_param, to_dtype


def _logits(x, w, contract_w: int) -> jax.Array:
    # Inputs in the compute dtype, accumulation and result in float32: the softmax over 32k classes
    # is where bf16 rounding hurts most.
    w = w.astype(x.dtype)
    return contract_trailing(x, w if contract_w == 0 else w.T, 1, preferred_element_type=jnp.float32)


class Embed(nnx.Module):
    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        *,
        init_std: float = 0.02,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.vocab_size, self.dtype = vocab_size, to_dtype(dtype)
        self.embedding = logical_param(
            rngs, jax.nn.initializers.normal(init_std), (vocab_size, d_model), ("vocab", "embed"), param_dtype
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied unembedding: float32 logits [..., vocab]."""
        return _logits(x.astype(self.dtype), self.embedding[...], 1)


class Unembed(nnx.Module):
    """Untied output projection (embed, vocab) giving float32 logits."""

    def __init__(
        self,
        d_model: int,
        vocab_size: int,
        *,
        init_std: float = 0.02,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = to_dtype(dtype)
        self.kernel = logical_param(
            rngs, jax.nn.initializers.normal(init_std), (d_model, vocab_size), ("embed", "vocab"), param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return _logits(x.astype(self.dtype), self.kernel[...], 0)
