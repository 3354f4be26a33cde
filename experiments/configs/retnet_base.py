"""RetNet family defaults (fla-org RetNetConfig): retention heads with key width d_model / num_heads,
values 2x wider, rotary q/k, swish-gated RMSNorm output, SwiGLU FFN (fla hidden ratio 2)."""

from experiments.configs import base


def get_config():
    config = base.get_config()
    config.model.update(
        name="retnet",
        num_heads=8,
        head_dim=0,  # key width per head; 0 = d_model // num_heads (fla expand_k = 1)
        mlp_hidden=1536,  # fla GatedMLP, hidden_ratio 2: 256-multiple at or above 4/3 * d_model
        rope_theta=10000.0,  # rotary position on q and k (fla; xPos in the paper)
        tie_embeddings=False,
    )
    config.model.expand_v = 2.0  # value width per head = head_dim * expand_v
    config.model.conv_width = 0  # no short conv on q/k/v (fla use_short_conv=False)
    config.model.qk_norm = "none"  # 'l2' | 'none'
    config.model.output_gate = True  # y = W_o(RMSNorm(o) * SiLU(x W_g))
    config.model.chunk_size = 64  # tokens per chunk of the chunked memory form
    config.model.remat_chunks = False  # recompute each memory chunk in the backward pass
    config.model.memory_impl = "xla"  # chunked form: 'xla' | 'pallas' (nl_jax/memory/ops/pallas_chunked.py)
    return config
