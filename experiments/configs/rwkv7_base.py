"""RWKV-7 family defaults (arXiv 2503.14456; the reference x070 code and fla-org's RWKV7 config):
heads of 64, channel mix 4 d_model wide, LoRA widths of the reference at d1024 (decay 64, in-context
rate 64, value residual 32, gate 128), LayerNorm eps 1e-5, untied embeddings."""

from experiments.configs import base


def get_config():
    config = base.get_config()
    config.model.update(
        name="rwkv7",
        head_dim=64,  # the reference's head size; num_heads = d_model // head_dim
        mlp_hidden=4096,  # channel mix width, 4 d_model
        rope_theta=0.0,  # no rotary
        norm_eps=1e-5,
        tie_embeddings=False,
    )
    config.model.decay_rank = 64  # LoRA width of the decay w
    config.model.a_rank = 64  # LoRA width of the in-context learning rate a
    config.model.v_rank = 32  # LoRA width of the value residual's mix
    config.model.gate_rank = 128  # LoRA width of the output gate g
    config.model.chunk_size = 16  # tokens per chunk of the chunked memory form ([C, C, Dk] decay products)
    config.model.remat_chunks = False  # recompute each memory chunk in the backward pass
    return config
