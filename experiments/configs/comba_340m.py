"""Comba 340M: 21 layers x d1024 (fla default depth), 3 heads (keys 256, values 512), conv 4,
SwiGLU 2816, tied embeddings, vocab 32000: 346,996,476 parameters.

    python -m experiments.pretrain --config=comba_340m
"""

from experiments.configs import base, comba_base


def get_config():
    config = comba_base.get_config()
    config.model.update(
        d_model=1024, num_layers=21, num_heads=3, head_dim=256, mlp_hidden=2816, tie_embeddings=True
    )
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights and float32 fast
    # weights; keep the projection outputs and recompute the rest of each block in the backward pass.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    return base.paper_recipe(config, tokens=15e9)  # docs/design.md, Decision 1: 340M on 15B tokens
