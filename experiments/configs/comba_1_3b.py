"""Comba 1.3B: 21 layers x d2048, 6 heads (keys 256, values 512), conv 4, SwiGLU 5632 (fla
CombaConfig defaults), tied embeddings (untied: 1,387,348,984, +6.7%), vocab 32000:
1,321,812,984 parameters.

    python -m experiments.pretrain --config=comba_1_3b
"""

from experiments.configs import base, comba_base


def get_config():
    config = comba_base.get_config()
    config.model.update(
        d_model=2048, num_layers=21, num_heads=6, head_dim=256, mlp_hidden=5632, tie_embeddings=True
    )
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights and float32 fast
    # weights; keep the projection outputs and recompute the rest of each block in the backward pass.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    # docs/design.md, Decision 1: 1.3B on 100B tokens
    return base.paper_recipe(config, tokens=100e9, grad_accum_steps=2)
