"""Samba family defaults: the transformer fields plus Mamba's (see nl_jax/models/samba.py)."""

from experiments.configs import base


def get_config():
    config = base.get_config()
    config.model.update(name="samba", tie_embeddings=True, sliding_window=2048, norm_eps=1e-5)
    config.model.d_state = 16  # Mamba SSM state size N per channel
    config.model.d_conv = 4  # Mamba causal depthwise conv width
    config.model.expand = 2  # Mamba inner width = expand * d_model
    config.model.dt_rank = 0  # rank of the dt projection; 0 = ceil(d_model / 16) (mamba_simple "auto")
    config.model.scan_chunk = 64  # tokens per chunk of the Mamba training scan
    config.model.scan_remat = False  # recompute each chunk's [C, Din, N] scan states in the backward pass
    return config
