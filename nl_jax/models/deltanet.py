"""DeltaNet (Schlag et al. 2021; Yang et al. 2024) as laid out by fla-org's DeltaNet layer.

Per head: q, k, v = SiLU(conv4(x W))  (causal depthwise conv, width 4), q and k l2-normalised,
beta_t = sigmoid(x W_b); S_t = S_{t-1} - beta_t (S_{t-1} k_t - v_t) k_t^T, o_t = S_t q_t / sqrt(Dk);
output y = W_o RMSNorm_head(o) (fla's default: no output gate; `output_gate=True` adds SiLU(x W_g)).
Blocks are pre-norm with a SwiGLU FFN. The delta rule is `presets.delta_rule` through the memory
core (chunked form: the UT/WY solve of `memory_chunked`), see `nl_jax.mixers.linear`.
"""

from nl_jax.models.linear_blocks import LinearLM
from nl_jax.models.registry import register


@register("deltanet")
class DeltaNet(LinearLM):
    MECHANISM = "delta_rule"
