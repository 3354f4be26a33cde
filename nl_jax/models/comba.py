"""Comba ("Comba: Improving Bilinear RNNs with Closed-loop Control", Hu et al. 2025, arXiv 2506.02475)
as laid out by fla-org's Comba layer: Gated DeltaNet's layer with a scalar-plus-low-rank transition
that erases at a scaled key (state feedback) and a corrected read (output feedback).

Per head h: q, k, v = SiLU(conv4(x W)), q and k l2-normalised; beta_t = sigmoid(x W_b) and the Mamba2
gate alpha_t = exp(-exp(A_log) softplus(x W_a + dt_bias)) as in Gated DeltaNet;

    p_t = sigmoid(lambda_h) k_t                                        state feedback
    S_t = alpha_t S_{t-1} (I - beta_t p_t k_t^T) + beta_t v_t k_t^T
    o_t = S_t (q_t - d_h p_t) / sqrt(Dk)                              output correction
    y = W_o (RMSNorm_head(o) * sigmoid(x W_g))

with lambda_h initialised to 1 and d_h to `correction_factor` (1, fla's default; fla notes that 0.02
sometimes works better for small models). The update is `presets.comba` through the memory core (its
chunked form: `vector_chunked` with one [C, C] decay matrix per head), see `nl_jax.mixers.linear`. Blocks are
pre-norm with a SwiGLU FFN; value heads are 2x wider, as in Gated DeltaNet.

Decisions where the sources leave a choice:
- fla's kernel l2-normalises p as well as q and k, which cancels sigmoid(lambda_h) from the update
  (p / ||p|| = k / ||k||) and leaves it only in the correction. Here p is the scaled unit key, so the
  transition is alpha (I - beta lambda k k^T) as the paper's scalar-plus-low-rank form reads, and the
  corrected query q - d p is not normalised again.
- The output gate is a sigmoid, as fla's Comba (Gated DeltaNet's is a SiLU).
- Packed rows: "reset" as the other gated linear models (alpha_t = 0 at a document's first token also
  zeroes the erase alpha_t beta_t, so the state restarts from zero).
"""

from nl_jax.models.linear_blocks import LinearLM
from nl_jax.models.registry import register


@register("comba")
class Comba(LinearLM):
    MECHANISM = "comba"
