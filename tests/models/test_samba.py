"""Samba: causality, decode (Mamba state + sliding-window KV cache) == full forward, layer order,
overfitting a fixed batch, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import configs
from experiments.configs import samba_base
from nl_jax.models import build_model
from nl_jax.models.samba import Samba
from tests.models.overfit import overfit_losses


def _cfg(**overrides):
    cfg = samba_base.get_config().model
    cfg.update(vocab_size=64, d_model=32, num_layers=4, num_heads=4, mlp_hidden=64, sliding_window=5)
    cfg.update(scan_chunk=4, init_std=0.1)
    cfg.update(overrides)
    return cfg


def test_logits_shape_dtype_and_causality():
    model = build_model(_cfg(), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 14), 0, 64)
    f = jax.jit(lambda t: model(t))
    logits = f(tokens)
    assert logits.shape == (2, 14, 64) and logits.dtype == jnp.float32
    changed = f(tokens.at[:, 6].set((tokens[:, 6] + 1) % 64))
    np.testing.assert_array_equal(logits[:, :6], changed[:, :6])
    # Beyond the window the change still reaches every later token, through the Mamba state.
    assert np.all(np.abs(np.asarray(logits[:, 6:] - changed[:, 6:])).max(axis=-1) > 0)


@pytest.mark.parametrize("overrides", [dict(), dict(scan_layers=False, num_kv_heads=2, num_layers=2)])
def test_decode_step_by_step_equals_full_forward(overrides):
    model = build_model(_cfg(**overrides), nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, 64)  # longer than the window: the cache wraps
    full = jax.jit(lambda t: model(t))(tokens)
    state = model.init_decode_state(2)
    assert state.attn.k.shape[2] == 5  # [groups, B, window, kv heads, head dim]: a ring buffer of the window
    step = jax.jit(lambda t, s: model.decode_step(t, s))
    logits = []
    for i in range(tokens.shape[1]):
        out, state = step(tokens[:, i], state)
        logits.append(out)
    np.testing.assert_allclose(jnp.stack(logits, 1), full, rtol=1e-4, atol=1e-5)


def test_group_applies_mamba_mlp_swa_mlp_in_order():
    model = build_model(_cfg(num_layers=2), nnx.Rngs(0))
    g = model.blocks._slice(0)  # the one group, taken out of the stacked layers
    x = jax.random.normal(jax.random.key(2), (2, 9, 32))
    h = x + g.mamba(g.mamba_norm(x))[0]
    h = h + g.mlp1(g.mlp1_norm(h))
    h = h + g.attn(g.attn_norm(h))
    h = h + g.mlp2(g.mlp2_norm(h))
    np.testing.assert_allclose(g(x)[0], h, rtol=1e-5, atol=1e-6)
    assert g.attn.sliding_window == 5 and g.mamba.A_log.shape == (64, 16)  # expand 2 * d_model, d_state


def test_bad_layer_count_is_rejected():
    with pytest.raises(ValueError, match="num_layers=3 must be even"):
        build_model(_cfg(num_layers=3), nnx.Rngs(0))


def test_flops_per_token_counts_the_matmuls():
    cfg = configs.load("samba_760m").model
    n_params = 766_121_472
    short, long = Samba.forward_flops_per_token(cfg, 2048), Samba.forward_flops_per_token(cfg, 8192)
    assert 2 * n_params < short < long < 2.5 * n_params  # attention grows with the window, then stops
    assert Samba.forward_flops_per_token(cfg, 16384) - long < long - short


def test_samba_tiny_overfits_a_fixed_batch():
    cfg = configs.load("samba_tiny").model
    tokens = jax.random.randint(jax.random.key(3), (4, 33), 0, cfg.vocab_size)
    losses = overfit_losses(build_model(cfg, nnx.Rngs(0)), tokens, lr=5e-3, steps=80)
    assert losses[0] > 5.0  # ~ln(260) at init
    assert losses[-1] < 0.05, losses[-10:]
