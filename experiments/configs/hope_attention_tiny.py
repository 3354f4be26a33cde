"""HOPE-Attention tiny: byte-level (vocab 260), 4 layers x d128, 4 heads, CMS 2 levels x SwiGLU 192
(periods 16, 64; ntp signal); 920,192 params.

Trains in minutes on a laptop CPU (sequence 256 = 16 ntp segments):
    python -m experiments.pretrain --config=hope_attention_tiny
"""

from experiments.configs import hope_base


def get_config():
    config = hope_base.get_config("hope_attention")
    config.model.update(vocab_size=260, d_model=128, num_layers=4, num_heads=4, tie_embeddings=False)
    config.model.scan_layers = False  # unrolled: faster steps on CPU (experiments/configs/base.py)
    config.model.cms.update(periods=(16, 64), hidden=(192, 192), inner_lr=(1e-2, 1e-2))
    return config
