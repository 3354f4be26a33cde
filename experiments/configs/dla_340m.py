"""DLA 340M: 24 layers x d1024, memory 16 heads x 64 (MLP memory, hidden 64, Hebbian objective),
SwiGLU 2432, tied embeddings, vocab 32000: 342,182,400 parameters.

    python -m experiments.pretrain --config=dla_340m
"""

from experiments.configs import base, dla_base


def get_config():
    config = dla_base.get_config()
    config.model.update(d_model=1024, num_layers=24, num_heads=16, mlp_hidden=2432, tie_embeddings=True)
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights and fast weights;
    # keep the projection outputs and recompute the rest in the backward pass.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    return base.paper_recipe(config, tokens=15e9)
