"""Gated DeltaNet tiny: byte-level (vocab 260), 4 layers x d128, 2 heads (keys 48, values 96), conv 4,
SwiGLU 384, untied: 1,059,344 parameters. Trains in minutes on a laptop CPU:

    python -m experiments.pretrain --config=gated_deltanet_tiny
"""

from experiments.configs import gated_deltanet_base


def get_config():
    config = gated_deltanet_base.get_config()
    config.model.update(
        vocab_size=260,
        d_model=128,
        num_layers=4,
        num_heads=2,
        head_dim=48,
        mlp_hidden=384,
        tie_embeddings=False,
    )
    config.model.scan_layers = False  # unrolled: faster steps on CPU (experiments/configs/base.py)
    # Laptop training as transformer_tiny: 600 steps of 8 x 256 bytes of the embedded corpus.
    config.optim.update(lr=3e-3, warmup_steps=50, weight_decay=0.1)
    config.train.update(steps=600, log_every=50)
    config.eval.update(every=100, max_batches=16)
    config.checkpoint.update(every=250)
    return config
