"""Memora 1.3B: 24 layers x d2048, memory 16 heads x 128 (MLP memory, hidden 512, KL retention),
SwiGLU 4096, untied, vocab 32000: 1,290,966,016 parameters.

    python -m experiments.pretrain --config=memora_1_3b
"""

from experiments.configs import base, memora_base


def get_config():
    config = memora_base.get_config()
    config.model.update(d_model=2048, num_layers=24, num_heads=16, mlp_hidden=4096, tie_embeddings=False)
    config.model.titans.memory.hidden = 512  # 4 x head_dim
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights and fast weights;
    # keep the projection outputs and recompute the rest in the backward pass.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    return base.paper_recipe(config, tokens=100e9, grad_accum_steps=2)
