"""Comba 760M: 21 layers x d1536, 6 heads (keys 192, values 384: num_heads * head_dim =
0.75 d_model), conv 4, SwiGLU 4096, tied embeddings (untied: 792,785,784), vocab 32000:
743,633,784 parameters.

    python -m experiments.pretrain --config=comba_760m
"""

from experiments.configs import base, comba_base


def get_config():
    config = comba_base.get_config()
    config.model.update(
        d_model=1536, num_layers=21, num_heads=6, head_dim=192, mlp_hidden=4096, tie_embeddings=True
    )
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights and float32 fast
    # weights; keep the projection outputs and recompute the rest of each block in the backward pass.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    # docs/design.md, Decision 1: 760M on 30B tokens
    return base.paper_recipe(config, tokens=30e9, grad_accum_steps=2)
