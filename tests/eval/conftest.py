"""Tiny models for the evaluation tests: a Transformer++ from the tiny config, and a bigram model
whose logits the test controls (log p(next | prev) = log_softmax(table[prev]))."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import configs
from nl_jax.models import build_model


class Bigram(nnx.Module):
    """logits[t] = table[tokens[t]]; decodes with a state holding only a token counter per row."""

    def __init__(self, table):
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))

    def __call__(self, tokens):
        return self.table[...][tokens]

    def init_decode_state(self, batch_size):
        return {"count": jnp.zeros((batch_size,), jnp.int32)}

    def decode_step(self, tokens, state):
        return self.table[...][tokens], {"count": state["count"] + 1}


@pytest.fixture
def bigram():
    def make(table):
        return Bigram(np.asarray(table, np.float32))

    return make


@pytest.fixture(scope="session")
def tiny_transformer_cfg():
    cfg = configs.load("transformer_tiny").model
    cfg.update(d_model=32, num_layers=2, num_heads=4, mlp_hidden=64)
    return cfg


@pytest.fixture(scope="session")
def tiny_transformer(tiny_transformer_cfg):
    return build_model(tiny_transformer_cfg, nnx.Rngs(0))
