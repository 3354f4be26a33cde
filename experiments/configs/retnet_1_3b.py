"""RetNet 1.3B: 24 layers x d2048, 8 retention heads (keys 256, values 512; the RetNet paper 1.3B
shape), SwiGLU 2816 (fla hidden ratio 2), untied, vocab 32000: 1,351,727,104 parameters
(tied embeddings would give 1,286,191,104).

    python -m experiments.pretrain --config=retnet_1_3b
"""

from experiments.configs import base, retnet_base


def get_config():
    config = retnet_base.get_config()
    config.model.update(d_model=2048, num_layers=24, num_heads=8, mlp_hidden=2816, tie_embeddings=False)
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights and float32 fast
    # weights; keep the projection outputs and recompute the rest of each block in the backward pass.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    # docs/design.md, Decision 1: 1.3B on 100B tokens
    return base.paper_recipe(config, tokens=100e9, grad_accum_steps=2)
