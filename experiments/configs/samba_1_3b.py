"""Samba 1.3B (microsoft/Samba `Samba_1.3B`): 18 layers (9 x Mamba + SWA, each + SwiGLU 6144) x d2304,
18 heads x 128, window 2048, Mamba expand 2 / d_state 16 / dt_rank 144, tied embeddings, vocab 32000:
1,330,207,488 parameters.

    python -m experiments.pretrain --config=samba_1_3b
"""

from experiments.configs import base, samba_base


def get_config():
    config = samba_base.get_config()
    config.model.update(d_model=2304, num_layers=18, num_heads=18, mlp_hidden=6144)
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    config.model.scan_remat = True  # the scan's per-token [Din, N] states are the largest activations
    config = base.paper_recipe(config, tokens=100e9, grad_accum_steps=2)
    # Pods: the default mesh (fsdp over the slice) with 2 microbatches fits v5p-64 and v4-64 (README).
    # Mamba's x_proj, dt_kernel and A_log split d_inner over 'tensor' only (their other dimension is
    # unnamed): without tensor parallelism about 1% of the weights stay whole on every device.
    config.mesh.sharding_tolerance = 0.4
    return config
