"""Samba tiny: byte-level (vocab 260), 4 layers (Mamba, SWA, Mamba, SWA; each + SwiGLU 384) x d128,
4 heads x 32, window 128, Mamba expand 2 / d_state 16, tied embeddings: 988,288 parameters.

    python -m experiments.pretrain --config=samba_tiny
"""

from experiments.configs import samba_base


def get_config():
    config = samba_base.get_config()
    config.model.update(
        vocab_size=260, d_model=128, num_layers=4, num_heads=4, mlp_hidden=384, sliding_window=128
    )
    config.model.scan_layers = False  # unrolled: faster steps on CPU (experiments/configs/base.py)
    # CPU training as transformer_tiny: 600 steps of 8 x 256 bytes of the embedded corpus.
    config.optim.update(lr=3e-3, warmup_steps=50, weight_decay=0.1)
    config.train.update(steps=600, log_every=50)
    config.eval.update(every=100, max_batches=16)
    config.checkpoint.update(every=250)
    return config
