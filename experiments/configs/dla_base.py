"""DLA family defaults: the Titans LMM layout (experiments/configs/titans_base.py: per-head MLP memory
M(z) = z + W1 SiLU(W2 z), short convs, forget and learning-rate gates, SwiGLU FFN) with the memory
trained on the dot-product (Hebbian) objective and no momentum (nl_jax/models/dla.py)."""

from experiments.configs import titans_base


def get_config():
    config = titans_base.get_config()
    config.model.name = "dla"
    config.model.titans.memory.update(objective="dot", momentum=False)
    return config
