"""Samba baseline (Ren et al. 2024, microsoft/Samba): Mamba layers interleaved with sliding-window
attention, each followed by a SwiGLU MLP, pre-norm RMSNorm residual blocks, tied embeddings.

Layer order (microsoft/Samba `mb_per_layer=2`): Mamba, MLP, SWA, MLP, Mamba, MLP, SWA, MLP, ...
The unit of the layer stack is one group of the four (`SambaGroup`), so `num_layers` counts the
mixer layers as Samba's `n_layer` does (Mamba and SWA alike) and must be even; the model has
num_layers / 2 groups.

Mamba as `mamba_simple.Mamba` with its defaults (expand 2, d_state 16, d_conv 4, dt_rank
ceil(d_model / 16)); attention is `nl_jax.mixers.attention.Attention` with RoPE and
`sliding_window` (2048 at full size). Decoding carries, per group, the Mamba conv/SSM state and a
ring-buffer KV cache of the window.

Config (`model` section, see experiments/configs/samba_base.py): the transformer fields plus
d_state, d_conv, expand, dt_rank (0: auto), scan_chunk (the Mamba scan's chunk length), scan_remat
(recompute each chunk's [C, Din, N] states in the backward pass).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers.linear import to_dtype
from nl_jax.layers.mlp import SwiGLU
from nl_jax.layers.norms import RMSNorm
from nl_jax.mixers.attention import Attention, KVCache, attention_dims
from nl_jax.mixers.mamba import Mamba, MambaState, mamba_flops_per_token
from nl_jax.models.lm import RESIDUAL, CausalLM
from nl_jax.models.registry import register
from nl_jax.parallel.rules import constrain


def _groups(cfg) -> int:
    if cfg.num_layers < 2 or cfg.num_layers % 2:
        raise ValueError(
            f"samba num_layers={cfg.num_layers} must be even and >= 2 (Mamba and SWA layers alternate)"
        )
    return cfg.num_layers // 2


def _dt_rank(cfg) -> int:
    return cfg.dt_rank or -(-cfg.d_model // 16)


class SambaState(NamedTuple):
    mamba: MambaState
    attn: KVCache


class SambaGroup(nnx.Module):
    """x -> Mamba -> MLP -> SWA -> MLP, each sub-layer `h = h + f(RMSNorm(h))`."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        kw = dict(init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = lambda: RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)  # noqa: E731
        self.mamba_norm, self.mlp1_norm, self.attn_norm, self.mlp2_norm = norm(), norm(), norm(), norm()
        self.mamba = Mamba(
            cfg.d_model,
            d_state=cfg.d_state,
            d_conv=cfg.d_conv,
            expand=cfg.expand,
            dt_rank=_dt_rank(cfg),
            chunk_size=cfg.scan_chunk,
            remat_chunks=cfg.scan_remat,
            **kw,
        )
        self.mlp1 = SwiGLU(cfg.d_model, cfg.mlp_hidden, **kw)
        self.attn = Attention.from_config(cfg, **kw)
        self.mlp2 = SwiGLU(cfg.d_model, cfg.mlp_hidden, **kw)

    def init_state(self, batch_size: int, max_len: int | None = None, documents: bool = False) -> SambaState:
        cache = self.attn.init_cache(batch_size, max_len, documents)
        return SambaState(self.mamba.init_state(batch_size), cache)

    def __call__(self, x, state: SambaState | None = None, segment_ids=None, restart=True):
        """`segment_ids` [B, T]: attention within documents and, with `restart` ("reset"; False is
        "mask"), Mamba's conv and SSM state restarting at each document's first token."""
        if state is None:
            m, _ = self.mamba(self.mamba_norm(x), segment_ids=segment_ids if restart else None)
            h = x + m
            h = h + self.mlp1(self.mlp1_norm(h))
            h = h + self.attn(self.attn_norm(h), segment_ids)
        else:
            m, mamba_state = self.mamba(self.mamba_norm(x), state.mamba, form="recurrent")
            h = x + m
            h = h + self.mlp1(self.mlp1_norm(h))
            a, cache = self.attn.decode(self.attn_norm(h), state.attn, segment_ids)
            h = h + a
            state = SambaState(mamba_state, cache)
        y = h + self.mlp2(self.mlp2_norm(h))
        return constrain(y, RESIDUAL), state


@register("samba")
class Samba(CausalLM):
    """The shell around num_layers / 2 SambaGroups. Decoding carries, per group, a zero-initialised
    Mamba conv/SSM state and a KV cache of the window (or of max_len if shorter).

    Packed rows: segment ids keep attention within a document ("mask", Mamba's state running across
    documents) and with "reset" (the forward's `restart=True`) also restart Mamba's conv and SSM
    state at each document's first token (its decay set to 0 there), so a packed row computes what
    its documents would alone. Decoding takes them too (the KV cache keeps each slot's document:
    `init_decode_state(..., documents=True)`; `decode_step(..., restart=True)` restarts the Mamba
    state of rows whose token starts a document)."""

    document_boundaries = ("ignore", "mask", "reset")
    documents_in_decoding = "blocks"
    mask_carries_memory = True  # "mask" is the forward's restart=False

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        # tied embeddings, as microsoft/Samba
        block = lambda r: SambaGroup(cfg, rngs=r)  # noqa: E731
        super().__init__(cfg, block, num_layers=_groups(cfg), tie_embeddings=True, rngs=rngs)

    def init_decode_state(self, batch_size: int, max_len: int | None = None, documents: bool = False):
        """As CausalLM's; with `documents` also the last token's document of each row."""
        layers = super().init_decode_state(batch_size, max_len, documents)
        if not documents:
            return layers
        return {"layers": layers, "segment": jnp.full((batch_size,), -1, jnp.int32)}

    def decode_step(
        self, tokens: jax.Array, state, segment_ids: jax.Array | None = None, restart: bool = True
    ):
        """As CausalLM's; with `segment_ids` [B]: attention within the token's document and, if
        `restart` ("reset"; False is "mask"), the Mamba state of rows starting a document restarted."""
        if segment_ids is None:
            return super().decode_step(tokens, state)
        if not isinstance(state, dict) or "segment" not in state:
            raise ValueError(
                "decoding with segment ids needs a state that keeps the documents: "
                "init_decode_state(batch_size, max_len, documents=True)"
            )
        ids = segment_ids.astype(jnp.int32)
        layers = state["layers"]
        if restart:
            mamba = self._restart_rows(ids != state["segment"], layers.mamba, part=lambda s: s.mamba)
            layers = layers._replace(mamba=mamba)
        logits, layers = super().decode_step(tokens, layers, ids)
        return logits, {"layers": layers, "segment": ids}

    @staticmethod
    def forward_flops_per_token(cfg, seq_len: int) -> float:
        """Analytic forward FLOPs per token, averaged over a sequence of seq_len tokens: Mamba
        (projections, conv, scan), attention projections and scores over the visible window, two
        SwiGLU MLPs per group, and the logits."""
        heads, kv, hd = attention_dims(cfg)
        d = cfg.d_model
        window = cfg.sliding_window or seq_len
        # Mean number of keys a query sees: min(t + 1, window) averaged over t < seq_len.
        t = jnp.arange(seq_len)
        keys = float(jnp.mean(jnp.minimum(t + 1, window)))
        attn = 2 * d * hd * (2 * heads + 2 * kv) + 2 * 2 * keys * heads * hd
        mamba = mamba_flops_per_token(d, cfg.expand * d, cfg.d_state, _dt_rank(cfg), cfg.d_conv)
        mlp = 2 * 3 * d * cfg.mlp_hidden
        return float(_groups(cfg) * (mamba + attn + 2 * mlp) + 2 * d * cfg.vocab_size)
