"""What RetNet, DeltaNet, Gated DeltaNet and Comba share: a pre-norm block around the linear
fast-weight mixer (`nl_jax.mixers.linear`, which holds the equations) and the language model around
it. Block: h = x + Mixer(Norm(x)); y = h + SwiGLU(Norm(h)).

Config (`model` section): vocab_size, d_model, num_layers, num_heads, head_dim (0: d_model //
num_heads), expand_v (value head width = head_dim * expand_v), mlp_hidden, conv_width (0: no conv),
qk_norm ('l2' | 'none'), rope_theta (0: no rotary), output_gate, output_gate_act ('silu' | 'sigmoid'),
correction_factor (Comba's initial d_h), chunk_size, remat_chunks,
memory_impl ('xla' | 'pallas': `memory_chunked`'s implementation of the chunked form), tie_embeddings,
norm_eps, dtype, param_dtype, scan_layers, remat_policy, init_std.
"""

from __future__ import annotations

from flax import nnx

from nl_jax.layers import RMSNorm, SwiGLU, to_dtype
from nl_jax.mixers.linear import (
    LinearMixer,
    MixerSettings,
    MixerState,
    memory_flops_per_token,
    mixer_settings,
)
from nl_jax.models.lm import RESIDUAL, FormsLM
from nl_jax.parallel.rules import constrain


class LinearBlock(nnx.Module):
    """h = x + Mixer(Norm(x)); y = h + SwiGLU(Norm(h)). Block state: the mixer's MixerState."""

    def __init__(self, cfg, settings: MixerSettings, *, rngs: nnx.Rngs):
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        kw = dict(init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.attn = LinearMixer(cfg.d_model, settings, norm_eps=cfg.norm_eps, **kw)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, **kw)

    def init_state(self, batch_size: int, max_len: int | None = None) -> MixerState:
        del max_len  # constant size
        return self.attn.init_state(batch_size)

    def __call__(self, x, state=None, form: str = "chunked", segment_ids=None):
        a, state = self.attn(self.attn_norm(x), state, form=form, segment_ids=segment_ids)
        h = x + a
        y = h + self.mlp(self.mlp_norm(h))
        return constrain(y, RESIDUAL), state


class LinearLM(FormsLM):
    """The shell around `num_layers` LinearBlocks. Subclasses set MECHANISM and register themselves."""

    MECHANISM = "linear_attention"
    # No attention to mask: segment ids restart the memory (module docstring).
    document_boundaries = ("ignore", "reset")
    documents_with_state = True  # the retention gates restart the memory in every form, from any state
    documents_in_decoding = "restart"  # "reset" is the fresh state at a document's first token

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        settings = mixer_settings(cfg, self.MECHANISM)
        super().__init__(cfg, lambda r: LinearBlock(cfg, settings, rngs=r), rngs=rngs)
        self.settings = settings

    @classmethod
    def forward_flops_per_token(cls, model_cfg, seq_len: int) -> float:
        """Matmul FLOPs of every projection and the logits, the short convs, and the chunked memory."""
        s = mixer_settings(model_cfg, cls.MECHANISM)
        d, h, dk, dv = model_cfg.d_model, s.num_heads, s.head_dim, s.value_dim
        proj = d * h * (2 * dk + dv) + h * dv * d + 3 * d * model_cfg.mlp_hidden
        gates = {"linear_attention": 0, "delta_rule": 1, "gated_delta_rule": 2, "comba": 2}[s.mechanism]
        proj += d * h * (gates + (dv if s.output_gate else 0))
        conv = s.conv_width * h * (2 * dk + dv)
        per_layer = 2 * proj + 2 * conv + memory_flops_per_token(s, seq_len)
        return model_cfg.num_layers * per_layer + 2 * d * model_cfg.vocab_size
