"""A tiny HOPE and a tiny Transformer++ each overfit one fixed batch (2 x 32 tokens) to near-zero loss
with AdamW: the whole model, inner loops included, is trainable end to end.

The HOPE here uses the `local` CMS signal: the outer gradient of the `ntp` signal is checked against
its brute-force reference in test_hope_ntp.py, and differentiating the self-modifying layer's
streaming path is too slow to compile on a shared CPU for a fast test."""

import jax
import pytest
from flax import nnx

from experiments import configs
from nl_jax.models import build_model
from tests.models.overfit import overfit_losses

V = 32


def _cfg(name):
    cfg = configs.load(f"{name}_tiny").model
    cfg.update(vocab_size=V, d_model=32, num_layers=2)
    if name == "hope":
        cfg.memory.update(num_heads=2, head_dim=16, chunk_size=4, memory_chunk_size=8)
        cfg.cms.update(periods=(8, 16), hidden=(32, 32), inner_lr=(1e-2, 1e-2), signal="local")
    else:
        cfg.update(num_heads=2, mlp_hidden=64)
    return cfg


@pytest.mark.parametrize("name", ["hope", "transformer"])
def test_tiny_model_overfits_a_fixed_batch(name):
    tokens = jax.random.randint(jax.random.key(0), (2, 33), 0, V)
    losses = overfit_losses(build_model(_cfg(name), nnx.Rngs(0)), tokens, lr=1e-2, steps=300)
    assert float(losses[0]) > 3.0  # ~ log(32) at init
    assert float(losses[-1]) < 0.05, (name, float(losses[-1]))
