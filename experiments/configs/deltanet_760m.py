"""DeltaNet 760M: 24 layers x d1536, 12 heads x 128, conv 4, SwiGLU 4096 (fla hidden ratio 4), untied,
vocab 32000: 778,744,320 parameters.

    python -m experiments.pretrain --config=deltanet_760m
"""

from experiments.configs import base, deltanet_base


def get_config():
    config = deltanet_base.get_config()
    config.model.update(d_model=1536, num_layers=24, num_heads=12, mlp_hidden=4096, tie_embeddings=False)
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights and float32 fast
    # weights; keep the projection outputs and recompute the rest of each block in the backward pass.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    # docs/design.md, Decision 1: 760M on 30B tokens
    return base.paper_recipe(config, tokens=30e9, grad_accum_steps=2)
