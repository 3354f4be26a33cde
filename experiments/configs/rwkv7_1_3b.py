"""RWKV-7 1_3b: 24 layers x d2048, 32 heads of 64, channel mix 8192, LoRA widths 96 / 96 / 64 / 256, tied
embeddings, vocab 32000: 1,324,861,440 parameters.

    python -m experiments.pretrain --config=rwkv7_1_3b
"""

from experiments.configs import base, rwkv7_base


def get_config():
    config = rwkv7_base.get_config()
    config.model.update(
        d_model=2048,
        num_layers=24,
        mlp_hidden=8192,
        decay_rank=96,
        a_rank=96,
        v_rank=64,
        gate_rank=256,
        tie_embeddings=True,
    )
    # TPU defaults (docs/design.md, Decision 10): bf16 matmuls over float32 master weights and float32 fast
    # weights; keep the projection outputs and recompute the rest of each block in the backward pass, and
    # each memory chunk's [C, C, Dk] decay products too.
    config.model.update(dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable", remat_chunks=True)
    return base.paper_recipe(config, tokens=100e9, grad_accum_steps=2)
