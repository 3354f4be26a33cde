"""Samba 340M: 22 layers (11 x Mamba + SWA, each + SwiGLU 2816) x d1024, 8 heads x 128, window 2048,
Mamba expand 2 / d_state 16 / dt_rank 64, tied embeddings, vocab 32000: 342,596,608 parameters.

Shape of microsoft/Samba (`Samba_421M`: head_dim 128, mb_per_layer 2) scaled to d1024 with the
fla SwiGLU width of that size.

    python -m experiments.pretrain --config=samba_340m
"""

from experiments.configs import base, samba_base


def get_config():
    config = samba_base.get_config()
    config.model.update(d_model=1024, num_layers=22, num_heads=8, mlp_hidden=2816)
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights; keep the
    # projection outputs.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    config.model.scan_remat = True  # the scan's per-token [Din, N] states are the largest activations
    config = base.paper_recipe(config, tokens=15e9)
    # Pods: the default mesh (fsdp over the slice) fits v5p-64 (README). Mamba's x_proj, dt_kernel and
    # A_log split d_inner over 'tensor' only (their other dimension is unnamed): without tensor
    # parallelism about 1% of the weights stay whole on every device.
    config.mesh.sharding_tolerance = 0.4
    return config
