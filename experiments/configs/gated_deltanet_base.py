"""Gated DeltaNet family defaults (fla-org GatedDeltaNetConfig): head_dim 256 with
num_heads * head_dim = 0.75 d_model, values 2x wider, short conv + SiLU, l2-normalised q/k, Mamba2
gate, SiLU-gated RMSNorm output, SwiGLU FFN (fla hidden ratio 4), 21 layers at 1.3B."""

from experiments.configs import base


def get_config():
    config = base.get_config()
    config.model.update(
        name="gated_deltanet",
        num_heads=6,
        head_dim=256,  # key width per head
        mlp_hidden=5632,  # fla GatedMLP, hidden_ratio 4: 256-multiple at or above 8/3 * d_model
        rope_theta=0.0,  # no rotary
        tie_embeddings=False,
    )
    config.model.expand_v = 2.0  # value width per head = head_dim * expand_v
    config.model.conv_width = 4  # causal depthwise conv on q/k/v (0: none)
    config.model.qk_norm = "l2"  # 'l2' | 'none'
    config.model.output_gate = True  # y = W_o(RMSNorm(o) * SiLU(x W_g))
    config.model.chunk_size = 64  # tokens per chunk of the chunked memory form
    config.model.remat_chunks = False  # recompute each memory chunk in the backward pass
    config.model.memory_impl = "xla"  # chunked form: 'xla' | 'pallas' (nl_jax/memory/ops/pallas_chunked.py)
    return config
