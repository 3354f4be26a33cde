"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025) as laid out by fla-org's GatedDeltaNet layer.

Per head: q, k, v = SiLU(conv4(x W)), q and k l2-normalised, beta_t = sigmoid(x W_b) and the Mamba2
gate alpha_t = exp(-exp(A_log) * softplus(x W_a + dt_bias)) (A_log, dt_bias per head, initialised as
in Mamba2 / fla); S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t / sqrt(Dk);
output y = W_o (RMSNorm_head(o) * SiLU(x W_g)). Value heads are `expand_v` = 2 times wider; fla sizes
the heads so that num_heads * head_dim = 0.75 d_model (about 6 d_model^2 per mixer). Blocks are pre-norm
with a SwiGLU FFN. The gated delta rule is `presets.gated_delta_rule` through the memory core, see
`nl_jax.mixers.linear`. A_log and dt_bias are excluded from weight decay in fla.
"""

from nl_jax.models.linear_blocks import LinearLM
from nl_jax.models.registry import register


@register("gated_deltanet")
class GatedDeltaNet(LinearLM):
    MECHANISM = "gated_delta_rule"
