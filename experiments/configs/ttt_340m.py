"""TTT-Linear 340M (ttt-lm-jax `350m-TTT`): 24 layers x d1024, 16 heads x 64, SwiGLU 2736,
mini-batch 16, Mamba backbone (pre-conv), tied embeddings, vocab 32000: 337,684,224 parameters
(TTT-MLP, `--config.model.ttt_layer=mlp`: 348,792,576).

    python -m experiments.pretrain --config=ttt_340m
"""

from experiments.configs import base, ttt_base


def get_config():
    config = ttt_base.get_config()
    config.model.update(d_model=1024, num_layers=24, num_heads=16, mlp_hidden=2736)
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights; keep the
    # projection outputs.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    return base.paper_recipe(config, tokens=15e9)
