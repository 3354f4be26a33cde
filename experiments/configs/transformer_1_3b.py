"""Transformer++ 1.3B: 24 layers x d2048, 16 heads x 128, SwiGLU 5376, untied (as fla gla_1B.json),
vocab 32000: 1,326,548,992 parameters. (fla's default 5632 would give 1.364B, +4.9%.)

    python -m experiments.pretrain --config=transformer_1_3b
"""

from experiments.configs import base


def get_config():
    config = base.get_config()
    config.model.update(d_model=2048, num_layers=24, num_heads=16, mlp_hidden=5376, tie_embeddings=False)
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights; keep the
    # projection outputs and recompute the attention matrices in the backward pass.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    return base.paper_recipe(config, tokens=100e9, grad_accum_steps=2)
