"""Transformer++: causality, KV-cache decoding, dtypes, overfitting a fixed batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nl_jax.models import build_model


def _forward(model, tokens):
    return jax.jit(lambda t: model(t))(tokens)


def test_logits_shape_dtype_and_causality(tiny_cfg):
    model = build_model(tiny_cfg(), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 64)
    f = jax.jit(lambda t: model(t))
    logits = f(tokens)
    assert logits.shape == (2, 10, 64) and logits.dtype == jnp.float32
    changed = f(tokens.at[:, 6].set((tokens[:, 6] + 1) % 64))
    np.testing.assert_array_equal(logits[:, :6], changed[:, :6])
    assert np.all(np.abs(np.asarray(logits[:, 6:] - changed[:, 6:])).max(axis=-1) > 0)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(num_kv_heads=2, tie_embeddings=True),
        dict(sliding_window=4, scan_layers=False),
    ],
)
def test_decode_with_kv_cache_equals_full_forward(tiny_cfg, overrides):
    model = build_model(tiny_cfg(**overrides), nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
    full = _forward(model, tokens)
    state = model.init_decode_state(2, max_len=9)
    step = jax.jit(lambda t, s: model.decode_step(t, s))
    logits = []
    for i in range(9):
        l, state = step(tokens[:, i], state)
        logits.append(l)
    np.testing.assert_allclose(jnp.stack(logits, 1), full, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny_cfg):
    model = build_model(tiny_cfg(dtype="bfloat16"), nnx.Rngs(0))
    ref = build_model(tiny_cfg(), nnx.Rngs(0))
    assert model.blocks.layers.mlp.up.kernel[...].dtype == jnp.float32
    tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, 64)
    logits = _forward(model, tokens)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, _forward(ref, tokens), atol=5e-2)


def test_bad_head_config_is_rejected(tiny_cfg):
    with pytest.raises(ValueError, match="num_heads=3"):
        build_model(tiny_cfg(num_heads=3), nnx.Rngs(0))


def test_tiny_transformer_overfits_a_fixed_batch(tiny_cfg):
    model = build_model(tiny_cfg(d_model=64, num_layers=2, mlp_hidden=128), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (4, 33), 0, 64)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def train(params, opt_state):
        def step(carry, _):
            p, o = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), o), loss

        return jax.lax.scan(step, (params, opt_state), None, length=150)

    (params, _), losses = train(params, opt_state)
    assert losses[0] > 3.5  # ~ln(64) at init
    assert losses[-1] < 0.05, losses[-10:]
