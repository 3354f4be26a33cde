"""RWKV-7 "Goose" (Peng et al. 2025, "RWKV-7 "Goose" with Expressive Dynamic State Evolution",
arXiv 2503.14456): the language model around `nl_jax.mixers.rwkv7`'s time mix and channel mix, laid
out as the paper's reference code (x070) and fla-org's RWKV7 model.

Block: h = x + TimeMix(LN(x)); y = h + ChannelMix(LN(h)); the first block also normalises its input,
the embeddings, with a LayerNorm of its own (the reference's ln0, in fla's first block).

Initialisation follows the reference (per layer i of L: the lerp coefficients, w0 / a0 / v0 biases,
k_k = 0.71 - 0.1 * linear, k_a = 1.02, r_k = -0.04, group-norm scale ((i + 1) / L)^0.7, orthogonal
W_r, W_v, W_1 and 0.1 W_k, zero W_o, W_2 and LoRA down-projections, 0.1-orthogonal LoRA
up-projections).

Decisions where the sources leave a choice:
- Layer 0's value residual is the identity (v_1 = v there), so every layer has the same parameters and
  the stack stays one scan; layer 0's v LoRA is built but has no effect (its gradient is 0). The
  value of layer 0 travels with the residual stream as part of the scan carry. Likewise every block
  has the embedding norm ln0 and only the first applies it (2 d_model unused parameters per layer).
- Block and embedding norms are LayerNorms with bias as in RWKV-7; the shell's final norm (shared by
  every model of this repository) is an RMSNorm where RWKV-7 has a LayerNorm.
- The orthogonal initial matrices are polar factors of Gaussian matrices by Newton-Schulz iterations
  (orthonormal to ~1e-6), not QR: the same distribution, without LAPACK in the jitted init.

Config (`model` section): vocab_size, d_model, num_layers, head_dim (the reference's head size, 64),
mlp_hidden (channel-mix width, 4 d_model), decay_rank, a_rank, v_rank, gate_rank (LoRA widths),
chunk_size, remat_chunks, tie_embeddings, norm_eps, dtype, param_dtype, scan_layers, remat_policy,
init_std (the embedding's std).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nl_jax.layers import LayerNorm, to_dtype
from nl_jax.layers.conv import document_continues
from nl_jax.mixers.rwkv7 import (
    LERPS,
    ChannelMix,
    Settings,
    TimeMix,
    TimeMixState,
    memory_flops_per_token,
    settings_of,
)
from nl_jax.models.lm import RESIDUAL, FormsLM
from nl_jax.models.registry import register
from nl_jax.optim.newton_schulz import newton_schulz
from nl_jax.parallel.rules import constrain


class BlockState(NamedTuple):
    attn: TimeMixState
    ffn_shift: jax.Array  # [B, D]


class RWKV7Block(nnx.Module):
    """h = x + TimeMix(LN(x)); y = h + ChannelMix(LN(h)). The carry is (x, v_first, depth): layer
    0's values and the index of the layer, for the value residual."""

    def __init__(self, cfg, s: Settings, *, rngs: nnx.Rngs):
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        kw = dict(init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_norm = LayerNorm(s.d_model, eps=s.norm_eps, param_dtype=param_dtype)  # layer 0 only
        self.attn_norm = LayerNorm(s.d_model, eps=s.norm_eps, param_dtype=param_dtype)
        self.attn = TimeMix(s, **kw)
        self.mlp_norm = LayerNorm(s.d_model, eps=s.norm_eps, param_dtype=param_dtype)
        self.mlp = ChannelMix(s, **kw)

    def init_state(self, batch_size: int, max_len: int | None = None) -> BlockState:
        del max_len  # constant size
        attn = self.attn.init_state(batch_size)
        return BlockState(attn, jnp.zeros_like(attn.shift))

    def __call__(self, carry, state: BlockState | None = None, form: str = "chunked", segment_ids=None):
        x, v_first, depth = carry
        keep = None if segment_ids is None else document_continues(segment_ids)
        x = jnp.where(depth == 0, self.embed_norm(x), x)
        a, v_first, attn_state = self.attn(
            self.attn_norm(x), v_first, depth == 0, None if state is None else state.attn, form, keep
        )
        h = x + a
        f, ffn_shift = self.mlp(self.mlp_norm(h), None if state is None else state.ffn_shift, keep)
        y = constrain(h + f, RESIDUAL)
        new_state = None if state is None else BlockState(attn_state, ffn_shift)
        return (y, v_first, depth + 1), new_state


def _orthogonal(key, shape, gain=1.0):
    """A [rows, cols] matrix with orthonormal rows or columns (whichever are fewer), times gain: the
    polar factor of a Gaussian matrix by Newton-Schulz iterations (matmuls only: a QR inside the
    jitted init stalls XLA's CPU executor), 12 quintic steps to lift every singular value near 1, then
    cubic steps that converge to 1 to float32 precision."""
    x = newton_schulz(jax.random.normal(key, shape, jnp.float32), ns_steps=12)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    for _ in range(8):
        x = 1.5 * x - 0.5 * (x @ x.T) @ x
    return gain * (x if wide else x.T)


def reference_init(num_layers: int, d: int, head_dim: int) -> dict:
    """The reference's per-layer initial values of the lerps, biases and scalings, float64 [L, ...]."""
    n = np.arange(d)
    linear = n / (d - 1) - 0.5
    half = (head_dim - 1) / 2
    zigzag = ((n % head_dim) - half) / half
    zigzag = zigzag * np.abs(zigzag)
    ddd = n / d
    out = {name: [] for name in ("r", "w", "k", "v", "a", "g", "ffn_k", "w0", "a0", "v0", "norm")}
    for i in range(num_layers):
        r0 = i / (num_layers - 1) if num_layers > 1 else 0.0  # 0 to 1
        r1 = 1.0 - i / num_layers  # 1 to almost 0
        for c, p in zip(LERPS, (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)):
            out[c].append(1.0 - ddd ** (p * r1))
        out["ffn_k"].append(1.0 - ddd ** (r1**4))
        out["w0"].append(-6 + 6 * (n / (d - 1)) ** (1 + r0**0.3) + 0.5 + 2.5 * zigzag)
        out["a0"].append(-0.19 + 0.3 * zigzag + 0.4 * linear)
        out["v0"].append(0.73 - 0.4 * linear)
        out["norm"].append(np.full(d, ((i + 1) / num_layers) ** 0.7))
    out = {name: np.stack(v) for name, v in out.items()}
    out["k_k"] = np.broadcast_to(0.71 - 0.1 * linear, (num_layers, d))
    return out


@register("rwkv7")
class RWKV7(FormsLM):
    """The shell around `num_layers` RWKV-7 blocks."""

    # No attention to mask: segment ids restart the state and the token shifts (module docstring).
    document_boundaries = ("ignore", "reset")
    documents_in_decoding = "restart"  # "reset" is the fresh state at a document's first token

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        s = settings_of(cfg)
        super().__init__(cfg, lambda r: RWKV7Block(cfg, s, rngs=r), rngs=rngs)
        self.settings = s
        self._reference_init(cfg.num_layers, rngs)

    def _reference_init(self, num_layers: int, rngs: nnx.Rngs):
        s = self.settings
        d, h, n, f = s.d_model, s.num_heads, s.head_dim, s.mlp_hidden
        layers = self.blocks.layers
        attn, ffn = layers.attn, layers.mlp
        ref = reference_init(num_layers, d, n)

        def put(param, value):
            param.value = jnp.broadcast_to(jnp.asarray(value, param.dtype), param.shape)

        for c in LERPS:
            put(getattr(attn, f"mu_{c}"), ref[c])
        put(ffn.mu_k, ref["ffn_k"])
        per_head = lambda z: z.reshape(num_layers, h, n)  # noqa: E731
        put(attn.w_lora.bias, per_head(ref["w0"]))
        put(attn.a_lora.bias, per_head(ref["a0"]))
        put(attn.v_lora.bias, per_head(ref["v0"]))
        put(attn.k_k, per_head(ref["k_k"]))
        put(attn.k_a, 1.02)
        put(attn.r_k, -0.04)
        put(attn.o_norm.scale, per_head(ref["norm"]))

        def orthogonal(param, rows, cols, gain=1.0):
            keys = jax.random.split(rngs.params(), num_layers)
            mats = jax.vmap(lambda key: _orthogonal(key, (rows, cols), gain))(keys)
            put(param, mats.reshape(param.shape))

        orthogonal(attn.r_proj.kernel, d, h * n)
        orthogonal(attn.k_proj.kernel, d, h * n, 0.1)
        orthogonal(attn.v_proj.kernel, d, h * n)
        orthogonal(ffn.key.kernel, d, f)
        for lora in (attn.w_lora, attn.a_lora, attn.v_lora, attn.g_lora):
            rank = lora.down.kernel.shape[-1]
            put(lora.down.kernel, 0.0)
            orthogonal(lora.up.kernel, rank, h * n, 0.1)
        put(attn.o_proj.kernel, 0.0)
        put(ffn.value.kernel, 0.0)

    def _run(self, tokens, states=None, *, segment_ids=None, **block_kwargs):
        if segment_ids is not None:
            block_kwargs["segment_ids"] = constrain(segment_ids, ("batch", "length"))
        s = self.settings
        h = constrain(self.embed(tokens), RESIDUAL)
        b, t = tokens.shape
        v_first = jnp.zeros((b, t, s.num_heads, s.head_dim), jnp.float32)  # set by layer 0
        (h, _, _), states = self.blocks((h, v_first, jnp.zeros((), jnp.int32)), states, **block_kwargs)
        return self._logits(h), states

    @classmethod
    def forward_flops_per_token(cls, model_cfg, seq_len: int) -> float:
        """Matmul FLOPs of every projection and the logits, and of the chunked memory."""
        s = settings_of(model_cfg)
        d, hn, f = s.d_model, s.num_heads * s.head_dim, s.mlp_hidden
        ranks = s.decay_rank + s.a_rank + s.v_rank + s.gate_rank
        proj = 4 * d * hn + ranks * (d + hn) + 2 * d * f
        per_layer = 2 * proj + memory_flops_per_token(s, seq_len)
        return model_cfg.num_layers * per_layer + 2 * d * model_cfg.vocab_size
