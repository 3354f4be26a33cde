"""DLA tiny: byte-level (vocab 260), 4 layers x d128, memory 4 heads x 32 (MLP memory, hidden 32,
Hebbian objective), chunks of 16, SwiGLU 384, untied: 1,028,352 parameters. Trains in minutes on a
laptop CPU:

    python -m experiments.pretrain --config=dla_tiny
"""

from experiments.configs import dla_base


def get_config():
    config = dla_base.get_config()
    config.model.update(
        vocab_size=260, d_model=128, num_layers=4, num_heads=4, mlp_hidden=384, tie_embeddings=False
    )
    config.model.scan_layers = False  # unrolled: faster steps on CPU (experiments/configs/base.py)
    config.model.titans.memory.chunk_size = 16
    return config
