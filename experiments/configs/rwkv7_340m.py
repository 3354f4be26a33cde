"""RWKV-7 340m: 24 layers x d1024, 16 heads of 64, channel mix 4096, LoRA widths 64 / 64 / 32 / 128, tied
embeddings, vocab 32000: 349,430,784 parameters.

    python -m experiments.pretrain --config=rwkv7_340m
"""

from experiments.configs import base, rwkv7_base


def get_config():
    config = rwkv7_base.get_config()
    config.model.update(
        d_model=1024,
        num_layers=24,
        mlp_hidden=4096,
        decay_rank=64,
        a_rank=64,
        v_rank=32,
        gate_rank=128,
        tie_embeddings=True,
    )
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights and float32 fast
    # weights; keep the projection outputs and recompute the rest of each block in the backward pass, and
    # each memory chunk's [C, C, Dk] decay products too.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable", remat_chunks=True)
    return base.paper_recipe(config, tokens=15e9)
