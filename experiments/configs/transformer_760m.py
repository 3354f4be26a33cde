"""Transformer++ 760M: 24 layers x d1536, 12 heads x 128, SwiGLU 4096 (fla's 8/3 rule), untied,
vocab 32000: 777,856,512 parameters.

    python -m experiments.pretrain --config=transformer_760m
"""

from experiments.configs import base


def get_config():
    config = base.get_config()
    config.model.update(d_model=1536, num_layers=24, num_heads=12, mlp_hidden=4096, tie_embeddings=False)
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights; keep the
    # projection outputs and recompute the attention matrices in the backward pass.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    return base.paper_recipe(config, tokens=30e9, grad_accum_steps=2)
