"""TTT-Linear 1.3B (ttt-lm-jax `1b-TTT`): 24 layers x d2048, 32 heads x 64, SwiGLU 5504,
mini-batch 16, Mamba backbone (pre-conv), tied embeddings, vocab 32000: 1,285,639,296 parameters
(TTT-MLP, `--config.model.ttt_layer=mlp`: 1,307,856,000).

    python -m experiments.pretrain --config=ttt_1_3b
"""

from experiments.configs import base, ttt_base


def get_config():
    config = ttt_base.get_config()
    config.model.update(d_model=2048, num_layers=24, num_heads=32, mlp_hidden=5504)
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    return base.paper_recipe(config, tokens=100e9, grad_accum_steps=2)
