"""DLA, deep linear attention: linear attention whose memory is deep, as the Nested Learning paper
("Nested Learning: The Illusion of Deep Learning Architectures", Behrouz et al. 2025) lists it in its
Table 2 - an MLP memory trained in context by gradient descent on the dot-product (Hebbian)
objective, `presets.deep_linear_attention`:

    q, k, v = SiLU(conv4(x W)) per head, q and k l2-normalised
    theta_t = max_lr * sigmoid(x W_theta),  alpha_t = 1 - sigmoid(x W_alpha)
    M_t = alpha_t M_{t-1} - theta_t d(-<M_B(k_t), v_t>)/dM,     M(z) = z + W1 SiLU(W2 z)
    y_t = W_o (RMSNorm(M_t(q_t)) * SiLU(x W_g))

With a matrix memory the same update is gated linear attention (S_t = alpha_t S_{t-1} + theta_t v_t
k_t^T). The model is the Titans LMM shell (nl_jax/models/titans.py: pre-norm blocks of the memory
layer and a SwiGLU FFN, the layer `nl_jax.mixers.titans.NeuralMemory`) with the memory's objective
set to 'dot' and no momentum; its config section is `model.titans`.

Decisions where the sources leave a choice:
- The paper names DLA without a layer design; the projections, short convs, gates, output norm and
  gate are Titans' (the paper's other deep memory), so DLA and Titans differ in the objective and
  momentum only.
- Retention: a data-dependent forget gate (alpha_t) as Titans; gradients of a chunk are taken at the
  chunk's start state (docs/design.md, Decision 6), since the MLP's Hebbian gradient depends on it.
- Packed rows: "reset" as Titans (the memory restarts from its meta-learned initial weights; documents
  start on the chunk grid).
"""

from nl_jax.models.registry import register
from nl_jax.models.titans import FixedMemoryLM


@register("dla")
class DLA(FixedMemoryLM):
    """Deep linear attention: the Titans LMM model with a Hebbian (dot-product) memory objective."""

    model_name, layout = "dla", ("dot", "l2")
