"""HOPE-Attention 1.3B: 24 layers x d2048, 16 heads, CMS 4 levels x SwiGLU 1408 (periods 16, 64, 256, 1024; ntp
signal), tied embeddings, vocab 32000: 1,298,909,184 parameters.

    python -m experiments.pretrain --config=hope_attention_1_3b
"""

from experiments.configs import base, hope_base


def get_config():
    config = hope_base.get_config("hope_attention")
    config.model.update(d_model=2048, num_layers=24, num_heads=16, tie_embeddings=True)
    config.model.cms.hidden = (1408, 1408, 1408, 1408)
    # TPU defaults: bf16 matmuls over float32 master weights (docs/design.md, Decision 10).
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable")
    config = base.paper_recipe(config, tokens=100e9)  # docs/design.md, Decision 1: 1.3B on 100B tokens
    # Pods (README table): the ntp backward keeps every sequence's CMS fast weights and KV caches
    # at each checkpoint (16 per 4096 tokens), so a microbatch holds one sequence per fsdp shard,
    # split 8 ways over 'tensor': 17.7 GiB per chip on v4-64 (with 'tensor' 4: 33.8, over its 32).
    config.mesh.update(ici_fsdp_parallelism=-1, ici_tensor_parallelism=8)
    config.train.grad_accum_steps = 32
    return config
