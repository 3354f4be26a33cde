"""Titans family defaults: the Transformer++ fields plus `model.titans` (variant, segments, persistent
memory, and the neural memory's settings). Pick a hybrid with `--config.model.titans.variant=mac`.
"""

import ml_collections

from experiments.configs import base


def titans_config() -> ml_collections.ConfigDict:
    """The `model.titans` section read by nl_jax.models.titans."""
    return ml_collections.ConfigDict(
        dict(
            variant="lmm",  # lmm (memory only) | mac (as context) | mag (as gate) | mal (as layer)
            segment_size=512,  # MAC: tokens per segment (its attention span); a multiple of chunk_size
            persistent_tokens=16,  # MAC / MAG / MAL: learnable tokens every query attends to
            memory=ml_collections.ConfigDict(
                dict(
                    num_heads=0,  # memory heads; 0 = model.num_heads
                    head_dim=0,  # per-head key/value width; 0 = d_model // num_heads
                    structure="mlp",  # mlp: M(z) = z + W1 s(W2 z) per head | linear: M(z) = W z
                    hidden=0,  # MLP memory hidden width; 0 = head_dim
                    activation="silu",  # s in the MLP memory
                    chunk_size=64,  # tokens whose inner gradients share the chunk-start memory
                    # post_update (Titans) | per_token | boundary (docs/design.md, Decision 6)
                    read="post_update",
                    momentum=True,  # surprise momentum S_t = eta_t S_{t-1} - theta_t grad
                    objective="l2",  # l2: 1/2 ||M(k) - v||^2 (Titans) | dot: -<M(k), v> (DLA)
                    retention="l2",  # l2: weight decay (Titans) | kl: KL divergence, simplex rows (Memora)
                    simplex_scale=1.0,  # retention="kl": what every row of the memory sums to
                    max_lr=0.1,  # theta_t = max_lr * sigmoid(x W_theta)
                    conv_width=4,  # causal depthwise conv on q / k / v
                    remat_chunks=False,  # recompute each chunk in the backward pass (saves memory)
                    form="chunked",  # chunked (training path) | naive (token-by-token reference)
                    impl="xla",  # chunked form: xla | pallas (nl_jax/memory/ops/pallas_chunked.py)
                )
            ),
        )
    )


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model.name = "titans"
    config.model.sliding_window = 512  # MAG / MAL attention window (0 = full causal); unused by LMM / MAC
    config.model.titans = titans_config()
    return config
