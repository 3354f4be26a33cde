"""HOPE 340M: 24 layers x d1024, self-modifying Titans 8 heads x 128, CMS 4 levels x SwiGLU 320 (periods 16,
64, 256, 1024; ntp signal), tied embeddings, vocab 32000: 335,425,920 parameters.

    python -m experiments.pretrain --config=hope_340m
"""

from experiments.configs import base, hope_base


def get_config():
    config = hope_base.get_config("hope")
    config.model.update(d_model=1024, num_layers=24, tie_embeddings=True)
    config.model.memory.update(num_heads=8, head_dim=128)
    config.model.cms.hidden = (320, 320, 320, 320)
    # TPU defaults: bf16 matmuls over float32 master weights (D10).
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    return base.paper_recipe(config, tokens=15e9)  # D1: 340M on 15B tokens
