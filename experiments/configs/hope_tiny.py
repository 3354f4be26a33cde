"""HOPE tiny: byte-level (vocab 260), 4 layers x d128, self-modifying Titans 4 heads x 32 (chunks of
16), CMS 2 levels x SwiGLU 192 (periods 16, 64; ntp signal); 1,023,776 params.

Trains in minutes on a laptop CPU (sequence 256 = 16 ntp segments):
    python -m experiments.pretrain --config=hope_tiny
"""

from experiments.configs import hope_base


def get_config():
    config = hope_base.get_config("hope")
    config.model.update(vocab_size=260, d_model=128, num_layers=4, tie_embeddings=False)
    config.model.scan_layers = False  # unrolled: faster steps on CPU (experiments/configs/base.py)
    # Small-memory chunks as long as the ntp segment (16): one chunk per segment and memory, no chunk
    # loop inside the segment scan. README, "The memory chunk of hope_tiny": 1.5x the tokens/s of
    # chunk 8, validation loss 1.4454 against 1.4452 after the 200-step default run.
    config.model.memory.update(num_heads=4, head_dim=32, chunk_size=16, memory_chunk_size=16)
    # The paper's next-token CMS signal. Inner lr 3e-3 from 200-step runs (README, "The CMS periods
    # and inner learning rate of hope_tiny"): validation loss 1.570 at 1e-3, 1.444 at 3e-3; at 1e-2
    # the outer gradient norm reached 6.6e4 by step 100.
    config.model.cms.update(periods=(16, 64), hidden=(192, 192), inner_lr=(3e-3, 3e-3), signal="ntp")
    config.data.update(global_batch_size=4)
    config.optim.update(lr=3e-3, warmup_steps=30, weight_decay=0.1)
    config.train.update(steps=200, log_every=20)
    config.eval.update(every=50, max_batches=16)
    config.checkpoint.update(every=100)
    return config
