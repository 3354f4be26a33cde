"""Memora (Miras, "It's All Connected: A Journey Through Test-Time Memorization, Attentional Bias,
Retention, and Online Optimization", Behrouz et al. 2025, arXiv 2504.13173): an MLP memory with the
l2 attentional bias and KL-divergence retention, whose update is a softmax (exponentiated-gradient)
step that keeps every row of its weights on a scaled probability simplex:

    q, k, v = SiLU(conv4(x W)) per head, q and k l2-normalised
    theta_t = max_lr * sigmoid(x W_theta),  alpha_t = 1 - sigmoid(x W_alpha)
    W_t = c Softmax_rows(alpha_t log W_{t-1} - theta_t grad 1/2 ||M_B(k_t) - v_t||^2)
    M(z) = z + W1 SiLU(W2 z);   y_t = W_o (RMSNorm(M_t(q_t)) * SiLU(x W_g))

The update is `nl_jax.memory.ops.memora` (its chunked form, token-by-token reference and decode
step), the layer `nl_jax.mixers.memora.MemoraMemory`; the model is the Titans LMM shell
(nl_jax/models/titans.py) with `model.titans.memory.retention='kl'`.

Decisions where the paper leaves a choice:
- Rows: the softmax runs over each row of each matrix (each output unit's incoming weights), the
  paper's "per slice" for neural-network memories.
- Scale: rows sum to c = `simplex_scale` = 1, so the memory's output is bounded (z plus a convex
  combination of its hidden activations); nl_jax/memory/ops/memora.py on the alternative.
- Parallel form: as the paper's parallel training form, inside a chunk the memory is read with the
  linear update W_t = alpha_t W_{t-1} - theta_t g_t and the softmax runs only at chunk ends; the
  state handed to the next chunk is the exact per-token KL step with gradients at the chunk's start
  state (no separate lag token: every token's gradient is taken at the same chunk-start state).
  Decoding follows the same chunk grid, so decoding equals the training forward.
- Memory: the Titans layer's residual MLP z + W1 SiLU(W2 z), without a LayerNorm on the branch (the
  simplex rows already bound it); hidden = 4 x head_dim in the configs (the paper's expansion 4).
- Gates: theta_t and alpha_t are one scalar per token and head (Titans' gates), not per channel.
- Packed rows: as Titans LMM, "reset" restarts the memory from its meta-learned initial logits at
  each document's first token (on the memory's chunk grid); "mask" is "ignore" (no attention).
"""

from nl_jax.models.registry import register
from nl_jax.models.titans import FixedMemoryLM


@register("memora")
class Memora(FixedMemoryLM):
    """Memora: the Titans LMM model with the KL-retention (softmax) memory update."""

    model_name, layout = "memora", ("l2", "kl")
