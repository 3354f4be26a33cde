"""DLA 760M: 24 layers x d1536, memory 12 heads x 128 (MLP memory, hidden 128, Hebbian objective),
SwiGLU 3328, untied, vocab 32000: 760,312,320 parameters.

    python -m experiments.pretrain --config=dla_760m
"""

from experiments.configs import base, dla_base


def get_config():
    config = dla_base.get_config()
    config.model.update(d_model=1536, num_layers=24, num_heads=12, mlp_hidden=3328, tie_embeddings=False)
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights and fast weights;
    # keep the projection outputs and recompute the rest in the backward pass.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    return base.paper_recipe(config, tokens=30e9, grad_accum_steps=2)
