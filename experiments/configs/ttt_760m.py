"""TTT-Linear 760M (ttt-lm-jax `760m-TTT`): 24 layers x d1536, 16 heads x 96, SwiGLU 4096,
mini-batch 16, Mamba backbone (pre-conv), tied embeddings, vocab 32000: 733,608,192 parameters
(TTT-MLP, `--config.model.ttt_layer=mlp`: 758,528,256).

    python -m experiments.pretrain --config=ttt_760m
"""

from experiments.configs import base, ttt_base


def get_config():
    config = ttt_base.get_config()
    config.model.update(d_model=1536, num_layers=24, num_heads=16, mlp_hidden=4096)
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    return base.paper_recipe(config, tokens=30e9, grad_accum_steps=2)
