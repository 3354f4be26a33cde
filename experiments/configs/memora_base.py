"""Memora family defaults: the Titans LMM layout (experiments/configs/titans_base.py) with the l2
objective, KL-divergence retention (softmax update, rows of the memory on a scaled simplex) and no
momentum (nl_jax/models/memora.py). The sized configs widen the memory MLP to 4 x head_dim, the
paper's expansion."""

from experiments.configs import titans_base


def get_config():
    config = titans_base.get_config()
    config.model.name = "memora"
    config.model.titans.memory.update(objective="l2", retention="kl", momentum=False, simplex_scale=1.0)
    return config
