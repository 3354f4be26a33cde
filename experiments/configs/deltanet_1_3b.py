"""DeltaNet 1.3B: 24 layers x d2048, 16 heads x 128, conv 4, SwiGLU 5376 (as transformer_1_3b and fla
gla_1B.json), untied, vocab 32000: 1,327,928,320 parameters.

    python -m experiments.pretrain --config=deltanet_1_3b
"""

from experiments.configs import base, deltanet_base


def get_config():
    config = deltanet_base.get_config()
    config.model.update(d_model=2048, num_layers=24, num_heads=16, mlp_hidden=5376, tie_embeddings=False)
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights and float32 fast
    # weights; keep the projection outputs and recompute the rest of each block in the backward pass.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    # docs/design.md, Decision 1: 1.3B on 100B tokens
    return base.paper_recipe(config, tokens=100e9, grad_accum_steps=2)
