"""RetNet (Sun et al. 2023) as laid out by fla-org's MultiScaleRetention: multi-scale retention.

Per head h: S_t = gamma_h S_{t-1} + v_t k_t^T, o_t = S_t q_t / sqrt(Dk), with fixed decays
gamma_h = 1 - 2^(-5-h) and rotary positions on q and k (fla uses RoPE where the paper has xPos);
output y = W_o (RMSNorm_head(o) * SiLU(x W_g)) (the paper's GroupNorm per head and swish gate, fla's
fused RMSNorm form). Value heads are `expand_v` = 2 times wider than the key heads. Blocks are pre-norm
with a SwiGLU FFN (fla's GatedMLP, hidden ratio 2). Retention is `presets.linear_attention` with
lr = 1 and the per-head decay, run through the memory core (see `nl_jax.mixers.linear`).
"""

from nl_jax.models.linear_blocks import LinearLM
from nl_jax.models.registry import register


@register("retnet")
class RetNet(LinearLM):
    MECHANISM = "linear_attention"
