"""DeltaNet family defaults (fla-org DeltaNetConfig): short conv + SiLU on q/k/v, l2-normalised q/k,
beta = sigmoid(x W_b), RMSNorm output without gate, SwiGLU FFN (fla hidden ratio 4)."""

from experiments.configs import base


def get_config():
    config = base.get_config()
    config.model.update(
        name="deltanet",
        num_heads=8,
        head_dim=0,  # key width per head; 0 = d_model // num_heads (fla expand_k = 1)
        mlp_hidden=2816,  # fla GatedMLP, hidden_ratio 4: 256-multiple at or above 8/3 * d_model
        rope_theta=0.0,  # no rotary: position comes from the conv and the recurrence
        tie_embeddings=False,
    )
    config.model.expand_v = 1.0  # value width per head = head_dim * expand_v
    config.model.conv_width = 4  # causal depthwise conv on q/k/v (0: none)
    config.model.qk_norm = "l2"  # 'l2' | 'none'
    config.model.output_gate = False  # fla use_gate=False: y = W_o RMSNorm(o)
    config.model.chunk_size = 64  # tokens per chunk of the chunked memory form
    config.model.remat_chunks = False  # recompute each memory chunk in the backward pass
    config.model.memory_impl = "xla"  # chunked form: 'xla' | 'pallas' (nl_jax/memory/ops/pallas_chunked.py)
    return config
