"""TTT-Linear / TTT-MLP: chunked inner loop == token-by-token reference (logits, final state,
gradients), causality, decode == full forward, overfitting a fixed batch, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import configs
from experiments.configs import ttt_base
from nl_jax.models import build_model
from tests.models.overfit import overfit_losses
from nl_jax.models.ttt import TTT, TTTLayer


def _cfg(**overrides):
    """Tiny dims; a larger init and inner lr than the defaults so the inner loop visibly matters."""
    cfg = ttt_base.get_config().model
    cfg.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, mlp_hidden=64, mini_batch_size=4)
    cfg.update(init_std=0.2, ttt_base_lr=4.0)
    cfg.update(overrides)
    return cfg


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


@pytest.mark.parametrize("layer", ["linear", "mlp"])
def test_chunked_equals_token_by_token_reference_logits_and_gradients(layer):
    model = build_model(_cfg(ttt_layer=layer), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, form):
        logits = nnx.merge(graphdef, p, copy=True)(tokens, form=form)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean(), logits

    @jax.jit
    def both(p):
        return [jax.value_and_grad(loss, has_aux=True)(p, form) for form in ("chunked", "naive")]

    ((_, logits_c), g_c), ((_, logits_n), g_n) = both(params)
    assert _rel(logits_c, logits_n) < 1e-5
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_c), jax.tree.leaves(g_n)):
        assert _rel(a, b) < 1e-5, path
    # The inner loop matters: with a vanishing inner lr the logits move.
    still = build_model(_cfg(ttt_layer=layer, ttt_base_lr=1e-6), nnx.Rngs(0))
    assert _rel(still(tokens), logits_c) > 1e-3


@pytest.mark.parametrize("layer", ["linear", "mlp"])
def test_layer_final_state_chunked_naive_recurrent_agree(layer):
    ttt = TTTLayer(_cfg(ttt_layer=layer), rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(3), (2, 8, 32))
    state = ttt.init_state(2)
    outs = {form: ttt(x, state, form=form) for form in ("chunked", "naive", "recurrent")}
    y_ref, s_ref = outs["naive"]
    for form in ("chunked", "recurrent"):
        y, s = outs[form]
        assert _rel(y, y_ref) < 1e-5, form
        for a, b in zip(jax.tree.leaves(s.memory), jax.tree.leaves(s_ref.memory)):
            assert _rel(a, b) < 1e-5, form
    moved = jax.tree.leaves(s_ref.memory.weights)[0] - jax.tree.leaves(state.memory.weights)[0]
    assert float(jnp.abs(moved).max()) > 1e-3  # the fast weights were trained


def test_logits_shape_dtype_and_causality():
    model = build_model(_cfg(), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
    f = jax.jit(lambda t: model(t))
    logits = f(tokens)
    assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
    changed = f(tokens.at[:, 5].set((tokens[:, 5] + 1) % 64))  # inside the second mini-batch
    np.testing.assert_array_equal(logits[:, :5], changed[:, :5])
    assert np.all(np.abs(np.asarray(logits[:, 5:] - changed[:, 5:])).max(axis=-1) > 0)


@pytest.mark.parametrize("overrides", [dict(ttt_layer="linear"), dict(ttt_layer="mlp", scan_layers=False)])
def test_decode_step_by_step_equals_full_forward(overrides):
    model = build_model(_cfg(**overrides), nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    full = jax.jit(lambda t: model(t))(tokens)
    state = model.init_decode_state(2)
    step = jax.jit(lambda t, s: model.decode_step(t, s))
    logits = []
    for i in range(tokens.shape[1]):
        out, state = step(tokens[:, i], state)
        logits.append(out)
    np.testing.assert_allclose(jnp.stack(logits, 1), full, rtol=1e-4, atol=1e-5)


def test_bad_input_is_rejected():
    model = build_model(_cfg(), nnx.Rngs(0))
    with pytest.raises(ValueError, match="mini_batch_size 4 does not divide the sequence length 10"):
        model(jnp.zeros((1, 10), jnp.int32))
    with pytest.raises(ValueError, match="ttt_layer must be one of"):
        build_model(_cfg(ttt_layer="conv"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="form must be one of"):
        model(jnp.zeros((1, 8), jnp.int32), form="parallel")


def test_flops_per_token_counts_the_matmuls():
    cfg = configs.load("ttt_760m").model
    flops = TTT.forward_flops_per_token(cfg, 4096)
    n_params = 733_497_216
    assert 2 * n_params < flops < 2.5 * n_params  # 2 N plus the inner loop (tied embedding used twice)
    cfg.ttt_layer = "mlp"
    assert TTT.forward_flops_per_token(cfg, 4096) > flops


def test_ttt_tiny_overfits_a_fixed_batch():
    cfg = configs.load("ttt_tiny").model
    tokens = jax.random.randint(jax.random.key(3), (4, 33), 0, cfg.vocab_size)
    losses = overfit_losses(build_model(cfg, nnx.Rngs(0)), tokens, lr=5e-3, steps=80)
    assert losses[0] > 5.0  # ~ln(260) at init
    assert losses[-1] < 0.05, losses[-10:]
