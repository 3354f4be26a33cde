"""The pieces the fast-weight mixers share around their memories.

Front end (Titans, self-modifying Titans, the linear-attention family): per head,

    z = SiLU(conv(x W))      a projection, a causal depthwise short conv, SiLU
    q, k = l2(z_q), l2(z_k)  unit keys and queries

Gated output: y = W_o (Norm_head(o) * act(x W_g)), a per-head norm times a gate of the layer's input.

They are functions over the caller's own sublayers, so every mixer keeps its parameter names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def l2_normalize(z: jax.Array, eps: float = 1e-6) -> jax.Array:
    """z / sqrt(||z||^2 + eps) over the last axis."""
    return z * jax.lax.rsqrt(jnp.sum(z * z, axis=-1, keepdims=True) + eps)


def conv_silu(projections: Sequence, convs: Sequence, x: jax.Array, tails: Sequence, segment_ids=None):
    """SiLU(conv(x W)) for each (projection, short conv, conv tail): x [B, T, D] -> (outputs in each
    projection's output shape [B, T, H, dh], new tails). A tail is None for a fresh start;
    `segment_ids` [B, T] stop the convs at documents' first tokens."""
    b, t, _ = x.shape
    outs, new_tails = [], []
    for proj, conv, tail in zip(projections, convs, tails, strict=True):
        z = proj(x)
        y, tail = conv.forward(z.reshape(b, t, -1), tail, segment_ids)
        outs.append(jax.nn.silu(y).reshape(z.shape))
        new_tails.append(tail)
    return outs, tuple(new_tails)


def gated_output(
    x: jax.Array, o: jax.Array, norm, gate_proj, out_proj, *, dtype, act: Callable = jax.nn.silu
) -> jax.Array:
    """W_o (norm(o) * act(x W_g)), or W_o norm(o) when `gate_proj` is None: o [B, T, H, dv] the
    memory's read, x [B, T, D] the layer's input."""
    o = norm(o.astype(dtype))
    return out_proj(o if gate_proj is None else o * act(gate_proj(x)))
