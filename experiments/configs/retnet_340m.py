"""RetNet 340M: 24 layers x d1024, 4 retention heads (keys 256, values 512), SwiGLU 1536 (fla
hidden ratio 2), tied embeddings (as transformer_340m), vocab 32000: 347,403,264 parameters.

    python -m experiments.pretrain --config=retnet_340m
"""

from experiments.configs import base, retnet_base


def get_config():
    config = retnet_base.get_config()
    config.model.update(d_model=1024, num_layers=24, num_heads=4, mlp_hidden=1536, tie_embeddings=True)
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights and float32 fast
    # weights; keep the projection outputs and recompute the rest of each block in the backward pass.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    return base.paper_recipe(config, tokens=15e9)  # docs/design.md, Decision 1: 340M on 15B tokens
