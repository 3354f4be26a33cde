"""HOPE 340M: 24 layers x d1024, self-modifying Titans 8 heads x 128, CMS 4 levels x SwiGLU 680 (periods 16,
64, 256, 1024; ntp signal), tied embeddings, vocab 32000: 340,734,336 parameters.

    python -m experiments.pretrain --config=hope_340m
"""

from experiments.configs import base, hope_base


def get_config():
    config = hope_base.get_config("hope")
    config.model.update(d_model=1024, num_layers=24, tie_embeddings=True)
    config.model.memory.update(num_heads=8, head_dim=128)
    config.model.cms.hidden = (680, 680, 680, 680)
    # TPU defaults: bf16 matmuls over float32 master weights (docs/design.md, Decision 10).
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    config = base.paper_recipe(config, tokens=15e9)  # docs/design.md, Decision 1: 340M on 15B tokens
    # Pods (README table): the ntp backward keeps every sequence's CMS fast weights and memory states
    # at each checkpoint (16 per 4096 tokens), so a microbatch holds one sequence per fsdp shard,
    # split 2 ways over 'tensor': fits v5p-64 and v4-64 (32 chips).
    config.mesh.update(ici_fsdp_parallelism=-1, ici_tensor_parallelism=2)
    config.train.grad_accum_steps = 8
    return config
