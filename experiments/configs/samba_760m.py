"""Samba 760M: 24 layers (12 x Mamba + SWA, each + SwiGLU 3840) x d1536, 12 heads x 128, window 2048,
Mamba expand 2 / d_state 16 / dt_rank 96, tied embeddings, vocab 32000: 766,121,472 parameters.

microsoft/Samba `Samba_421M` (d1536, 12 heads) made 24 layers deep, with the MLP narrowed from
4096 to 3840 to land at 760M.

    python -m experiments.pretrain --config=samba_760m
"""

from experiments.configs import base, samba_base


def get_config():
    config = samba_base.get_config()
    config.model.update(d_model=1536, num_layers=24, num_heads=12, mlp_hidden=3840)
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    config.model.scan_remat = True  # the scan's per-token [Din, N] states are the largest activations
    config = base.paper_recipe(config, tokens=30e9, grad_accum_steps=2)
    # Pods: the default mesh (fsdp over the slice) with 2 microbatches fits v5p-64 and v4-64 (README).
    # Mamba's x_proj, dt_kernel and A_log split d_inner over 'tensor' only (their other dimension is
    # unnamed): without tensor parallelism about 1% of the weights stay whole on every device.
    config.mesh.sharding_tolerance = 0.4
    return config
