"""RMSNorm (Zhang & Sennrich 2019) and LayerNorm (Ba et al. 2016), computed in float32 whatever the
compute dtype."""

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers.linear import logical_param


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2, last axis) + eps) * scale, with a learned scale initialised to 1."""

    def __init__(self, dim: int, *, eps: float = 1e-6, names=("norm",), param_dtype=jnp.float32):
        self.eps = eps
        self.scale = logical_param(None, jax.nn.initializers.ones, (dim,), names, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        # float32 statistics: bf16 sums of squares lose too many bits over d_model ~ 2048 terms.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis (float32 statistics); scale
    starts at 1 and bias at 0. `shape` may hold several trailing axes, e.g. (heads, head_dim) for a
    per-head scale of a group norm applied to [.., heads, head_dim] inputs."""

    def __init__(self, shape, *, eps: float = 1e-5, names=("norm",), param_dtype=jnp.float32):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.eps = eps
        self.scale = logical_param(None, jax.nn.initializers.ones, shape, names, param_dtype)
        self.bias = logical_param(None, jax.nn.initializers.zeros, shape, names, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)
