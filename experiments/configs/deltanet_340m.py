"""DeltaNet 340M: 24 layers x d1024, 8 heads x 128, conv 4, SwiGLU 2816 (fla delta_net_340M.json),
tied embeddings (that json unties them: 374,362,112, +10%), vocab 32000: 341,594,112 parameters.

    python -m experiments.pretrain --config=deltanet_340m
"""

from experiments.configs import base, deltanet_base


def get_config():
    config = deltanet_base.get_config()
    config.model.update(d_model=1024, num_layers=24, num_heads=8, mlp_hidden=2816, tie_embeddings=True)
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights and float32 fast
    # weights; keep the projection outputs and recompute the rest of each block in the backward pass.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    return base.paper_recipe(config, tokens=15e9)  # docs/design.md, Decision 1: 340M on 15B tokens
