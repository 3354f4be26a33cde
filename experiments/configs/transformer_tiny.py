"""Transformer++ tiny: byte-level (vocab 260: 256 bytes + PAD/BOS/EOS, rounded up), 4 layers x d128, 4 heads, SwiGLU 384; 919,680 params.

Trains in minutes on a laptop CPU:
    python -m experiments.pretrain --config=transformer_tiny
"""

from experiments.configs import base


def get_config():
    config = base.get_config()
    config.model.update(
        vocab_size=260, d_model=128, num_layers=4, num_heads=4, mlp_hidden=384, tie_embeddings=False
    )
    return config
