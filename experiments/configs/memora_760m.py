"""Memora 760M: 24 layers x d1536, memory 12 heads x 128 (MLP memory, hidden 512, KL retention),
SwiGLU 3072, untied, vocab 32000: 760,312,320 parameters.

    python -m experiments.pretrain --config=memora_760m
"""

from experiments.configs import base, memora_base


def get_config():
    config = memora_base.get_config()
    config.model.update(d_model=1536, num_layers=24, num_heads=12, mlp_hidden=3072, tie_embeddings=False)
    config.model.titans.memory.hidden = 512  # 4 x head_dim
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights and fast weights;
    # keep the projection outputs and recompute the rest in the backward pass.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    return base.paper_recipe(config, tokens=30e9, grad_accum_steps=2)
