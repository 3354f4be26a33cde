"""Titans tiny: byte-level (vocab 260), 4 layers x d128, 4 heads x 32, SwiGLU 384, untied; MLP memory
per head (hidden 32), chunks of 16; LMM: 1,030,400 parameters.

Hybrids (segments of 64 for MAC, a window of 64 for MAG / MAL, 4 persistent tokens):
    python -m experiments.pretrain --config=titans_tiny --config.model.titans.variant=mac
"""

from experiments.configs import titans_base


def get_config():
    config = titans_base.get_config()
    config.model.update(
        vocab_size=260, d_model=128, num_layers=4, num_heads=4, mlp_hidden=384, tie_embeddings=False
    )
    config.model.scan_layers = False  # unrolled: faster steps on CPU (experiments/configs/base.py)
    config.model.sliding_window = 64
    config.model.titans.update(segment_size=64, persistent_tokens=4)
    config.model.titans.memory.chunk_size = 16
    return config
