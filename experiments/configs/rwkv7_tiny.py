"""RWKV-7 tiny: byte-level (vocab 260), 4 layers x d128, 2 heads of 64, channel mix 512, LoRA widths
32 / 32 / 16 / 64, untied: 1,011,328 parameters. Trains in minutes on a laptop CPU:

    python -m experiments.pretrain --config=rwkv7_tiny
"""

from experiments.configs import rwkv7_base


def get_config():
    config = rwkv7_base.get_config()
    config.model.update(
        vocab_size=260,
        d_model=128,
        num_layers=4,
        mlp_hidden=512,
        decay_rank=32,
        a_rank=32,
        v_rank=16,
        gate_rank=64,
    )
    config.model.scan_layers = False  # unrolled: faster steps on CPU (experiments/configs/base.py)
    # Laptop training as transformer_tiny: 600 steps of 8 x 256 bytes of the embedded corpus.
    config.optim.update(lr=3e-3, warmup_steps=50, weight_decay=0.1)
    config.train.update(steps=600, log_every=50)
    config.eval.update(every=100, max_batches=16)
    config.checkpoint.update(every=250)
    return config
