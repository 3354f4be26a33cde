"""TTT family defaults: the transformer fields plus the TTT layer's (see nl_jax/mixers/ttt.py)."""

from experiments.configs import base


def get_config():
    config = base.get_config()
    config.model.update(name="ttt", tie_embeddings=True)
    config.model.ttt_layer = "linear"  # inner model: 'linear' (TTT-Linear) or 'mlp' (TTT-MLP)
    config.model.mini_batch_size = 16  # inner GD mini-batch = chunk of the memory core (TTT: 16)
    config.model.ttt_base_lr = 0.0  # eta = base * sigmoid(.) / head_dim; 0: 1.0 linear, 0.1 mlp (TTT)
    config.model.ttt_mlp_expand = 4  # TTT-MLP hidden width / head_dim
    config.model.conv_width = 4  # the block's pre-conv and the q/k convs
    return config
