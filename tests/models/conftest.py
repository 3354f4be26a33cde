import pytest

from experiments.configs import transformer_tiny


@pytest.fixture
def tiny_cfg():
    """A very small Transformer++ model config; keyword overrides are applied on top."""

    def make(**overrides):
        cfg = transformer_tiny.get_config().model
        cfg.update(vocab_size=64, d_model=32, num_layers=3, num_heads=4, mlp_hidden=64)
        cfg.update(overrides)
        return cfg

    return make
