"""HOPE 1.3B: 24 layers x d2048, self-modifying Titans 16 heads x 128, CMS 4 levels x SwiGLU 1472 (periods 16,
64, 256, 1024; ntp signal), tied embeddings, vocab 32000: 1,299,994,368 parameters.

    python -m experiments.pretrain --config=hope_1_3b
"""

from experiments.configs import base, hope_base


def get_config():
    config = hope_base.get_config("hope")
    config.model.update(d_model=2048, num_layers=24, tie_embeddings=True)
    config.model.memory.update(num_heads=16, head_dim=128)
    config.model.cms.hidden = (1472, 1472, 1472, 1472)
    # TPU defaults: bf16 matmuls over float32 master weights (docs/design.md, Decision 10).
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    config = base.paper_recipe(config, tokens=100e9)  # docs/design.md, Decision 1: 1.3B on 100B tokens
    # Pods (README table): the ntp backward keeps every sequence's CMS fast weights and memory states
    # at each checkpoint (16 per 4096 tokens), so a microbatch holds one sequence per fsdp shard,
    # split 8 ways over 'tensor' (with 4, the step needs 35.0 GiB per chip, more than a v4 chip has):
    # fits v5p-64 and v4-64 (32 chips).
    config.mesh.update(ici_fsdp_parallelism=-1, ici_tensor_parallelism=8)
    config.train.grad_accum_steps = 32
    return config
