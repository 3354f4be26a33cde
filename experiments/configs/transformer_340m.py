"""Transformer++ 340M: 24 layers x d1024, 16 heads x 64, SwiGLU 2816, tied embeddings
(fla-org transformer_340M.json), vocab 32000: 341,099,520 parameters.

    python -m experiments.pretrain --config=transformer_340m
"""

from experiments.configs import base


def get_config():
    config = base.get_config()
    config.model.update(d_model=1024, num_layers=24, num_heads=16, mlp_hidden=2816, tie_embeddings=True)
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights; keep the
    # projection outputs and recompute the attention matrices in the backward pass.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    return base.paper_recipe(config, tokens=15e9)
