"""Rotary position embedding (Su et al. 2021), "rotate half" layout as in Llama / fla."""

import jax
import jax.numpy as jnp


def rope_inv_frequencies(head_dim: int, theta: float = 10000.0) -> jax.Array:
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    return 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotates x [..., T, H, D] by angle position * theta^(-2i/D) on the pairs (i, i + D/2).

    positions: int [T] (shared by the batch) or [B, T]. Angles are computed in float32 (bf16
    positions above 256 are not even exact integers); the result has x's dtype.
    """
    d = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rope_inv_frequencies(d, theta)  # [.., T, D/2]
    cos = jnp.cos(angles)[..., None, :]  # broadcast over heads
    sin = jnp.sin(angles)[..., None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
