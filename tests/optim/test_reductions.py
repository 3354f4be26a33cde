"""Each deep optimizer equals an optax optimizer (or a plain reference) under its degenerate settings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nl_jax import optim

PARAMS = {
    "w": jnp.linspace(-1.0, 1.0, 48).reshape(6, 8),
    "stack": jnp.linspace(-0.5, 0.7, 2 * 6 * 8).reshape(2, 6, 8),
    "b": jnp.linspace(0.1, 0.4, 8),
    "s": jnp.asarray(0.3),
}


def grads_at(params, i):
    """Step i's gradients: fixed standard-normal draws (numpy, so no RNG kernels to compile)."""
    rng = np.random.default_rng(100 + i)
    return jax.tree.map(lambda p: rng.standard_normal(np.shape(p)).astype(np.float32), params)


def trajectory(tx, steps=6, params=PARAMS):
    """Parameters after each of `steps` updates on fixed random gradients (params passed)."""
    grads = jax.tree.map(lambda *g: np.stack(g), *[grads_at(params, i) for i in range(steps)])

    @jax.jit
    def run(params, grads):
        def body(carry, g):
            params, state = carry
            u, state = tx.update(g, state, params)
            params = optax.apply_updates(params, u)
            return (params, state), params

        return jax.lax.scan(body, (params, tx.init(params)), grads)[1]

    stacked = jax.device_get(run(params, grads))
    return [jax.tree.map(lambda x: x[i], stacked) for i in range(steps)]


def assert_same(a, b, rtol=0.0, atol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if rtol == 0 and atol == 0:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_memory_is_sgd_momentum(nesterov):
    ours = trajectory(optim.momentum_memory(0.1, decay=0.9, inner_lr=1.0, nesterov=nesterov))
    ref = trajectory(optax.sgd(0.1, momentum=0.9, nesterov=nesterov))
    assert_same(ours, ref)


def test_momentum_memory_inner_lr_is_ema():
    ours = trajectory(optim.momentum_memory(0.1, decay=0.8, inner_lr=0.2))
    ref = trajectory(optax.chain(optax.ema(0.8, debias=False), optax.scale_by_learning_rate(0.1)))
    assert_same(ours, ref, rtol=1e-6, atol=1e-7)


def test_deep_momentum_linear_memory_is_sgd_momentum():
    ours = trajectory(optim.deep_momentum(0.1, decay=0.9, memory=None))
    assert_same(ours, trajectory(optax.sgd(0.1, momentum=0.9)))


def test_deep_momentum_frozen_mlp_is_sgd_momentum():
    # mlp_lr = 0: the MLP's output weights stay 0, only the linear path of the memory learns.
    ours = trajectory(optim.deep_momentum(0.1, decay=0.9, mlp_lr=0.0))
    assert_same(ours, trajectory(optax.sgd(0.1, momentum=0.9)))


def test_deep_momentum_mlp_changes_the_update():
    ours = trajectory(optim.deep_momentum(0.1, decay=0.9, mlp_lr=1.0), steps=3)
    ref = trajectory(optax.sgd(0.1, momentum=0.9), steps=3)
    assert not np.allclose(np.asarray(ours[-1]["w"]), np.asarray(ref[-1]["w"]), atol=1e-3)
    # vectors and scalars have no MLP: plain momentum there.
    assert_same([o["b"] for o in ours], [r["b"] for r in ref])


def test_delta_momentum_beta0_is_sgd_momentum():
    # Equal to float32 rounding (XLA fuses optax's g + decay m into one FMA, ours in another order).
    assert_same(
        trajectory(optim.delta_momentum(0.1, decay=0.9, beta=0.0)),
        trajectory(optax.sgd(0.1, momentum=0.9)),
        rtol=1e-6,
        atol=1e-7,
    )


def test_preconditioned_momentum_identity_is_sgd_momentum():
    ours = trajectory(optim.preconditioned_momentum(0.1, 0.9, preconditioner=optax.identity()))
    assert_same(ours, trajectory(optax.sgd(0.1, momentum=0.9)))


def test_preconditioned_momentum_rms_is_rmsprop_momentum():
    p = optax.scale_by_rms(decay=0.95, eps=1e-6, eps_in_sqrt=False, bias_correction=True)
    ours = trajectory(optim.preconditioned_momentum(0.01, 0.9, preconditioner=p))
    ref = trajectory(
        optax.rmsprop(0.01, decay=0.95, eps=1e-6, eps_in_sqrt=False, bias_correction=True, momentum=0.9)
    )
    assert_same(ours, ref, rtol=1e-6, atol=1e-7)  # float32 rounding: XLA fuses the two differently


def test_adam_memory_is_adam():
    ours = trajectory(optim.adam_memory(0.01, b1=0.8, b2=0.95, eps=1e-6))
    assert_same(ours, trajectory(optax.adam(0.01, b1=0.8, b2=0.95, eps=1e-6)))


def test_adam_memory_with_decay_is_adamw():
    ours = trajectory(optim.adam_memory(0.01, weight_decay=0.1))
    assert_same(ours, trajectory(optax.adamw(0.01, weight_decay=0.1)))


def test_adam_memory_identity_value_is_debiased_momentum():
    ours = trajectory(optim.adam_memory(0.01, b1=0.9, value="identity", ridge=0.0))
    ref = trajectory(optax.chain(optax.ema(0.9, debias=True), optax.scale_by_learning_rate(0.01)))
    assert_same(ours, ref, rtol=1e-6, atol=1e-7)


def _reference_ns(x, steps=5, coeffs=(3.4445, -4.7750, 2.0315), eps=1e-7):
    """Plain Newton-Schulz on one 2-D matrix (numpy float32, the textbook loop)."""
    a, b, c = coeffs
    x = np.asarray(x, np.float32)
    tr = x.shape[0] > x.shape[1]
    x = x.T if tr else x
    x = x / (np.linalg.norm(x) + np.float32(eps))
    for _ in range(steps):
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x.T if tr else x


def test_muon_is_momentum_plus_newton_schulz():
    """muon(shape_scale='none') == python loop: m = beta m + g; W -= lr NS(m) (stacked: per layer)."""
    params = {"w": PARAMS["w"], "stack": PARAMS["stack"]}
    ours = trajectory(optim.muon(0.05, beta=0.9, shape_scale="none"), steps=4, params=params)
    p = {k: np.asarray(v, np.float32) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    for i in range(4):
        grads = grads_at(params, i)  # the gradients trajectory() uses
        for k in p:
            g = np.asarray(grads[k])
            m[k] = np.float32(0.9) * m[k] + g
            if m[k].ndim == 2:
                p[k] = p[k] - np.float32(0.05) * _reference_ns(m[k])
            else:
                p[k] = p[k] - np.float32(0.05) * np.stack([_reference_ns(x) for x in m[k]])
        assert_same(ours[i], p, rtol=1e-5, atol=1e-6)


def test_muon_matches_optax_contrib_muon():
    """Default width scaling, no nesterov: optax.contrib.muon on 2-D weights (NS is scale-invariant,
    so optax's debiased EMA and our trace agree up to the eps of the normalisation)."""
    params = {"w": PARAMS["w"], "v": PARAMS["w"].T}
    ours = trajectory(optim.muon(0.05, beta=0.9, eps=1e-12), steps=4, params=params)
    ref = trajectory(optax.contrib.muon(0.05, beta=0.9, eps=1e-12, nesterov=False), steps=4, params=params)
    assert_same(ours, ref, rtol=2e-5, atol=2e-6)


def test_adam_memory_rejects_a_ridge_it_would_ignore():
    with pytest.raises(ValueError, match="ridge applies to value='identity'"):
        optim.scale_by_adam_memory(ridge=0.1)


def test_deep_momentum_gradient_key_linear_memory_is_sgd_momentum():
    ours = trajectory(optim.deep_momentum(0.1, decay=0.9, memory=None, key="gradient"))
    assert_same(ours, trajectory(optax.sgd(0.1, momentum=0.9)))


def test_delta_momentum_literal_beta0_is_sgd_momentum():
    assert_same(
        trajectory(optim.delta_momentum(0.1, decay=0.9, beta=0.0, form="literal")),
        trajectory(optax.sgd(0.1, momentum=0.9)),
        rtol=1e-6,
        atol=1e-7,
    )


def test_delta_gd_without_decay_is_sgd():
    assert_same(trajectory(optim.delta_gd(0.1, decay=0.0)), trajectory(optax.sgd(0.1)))


def test_feature_momentum_identity_map_is_sgd_momentum():
    ours = trajectory(optim.feature_momentum(0.1, decay=0.9, coeffs=(1.0,)))
    assert_same(ours, trajectory(optax.sgd(0.1, momentum=0.9)))


def test_generalized_gd_window_one_is_sgd():
    assert_same(trajectory(optim.generalized_gd(0.1, weights=(1.0,))), trajectory(optax.sgd(0.1)))


def test_generalized_momentum_window_one_is_sgd_momentum():
    ours = trajectory(optim.generalized_gd(0.1, weights=(1.0,), decay=0.9, form="momentum"))
    assert_same(ours, trajectory(optax.sgd(0.1, momentum=0.9)))


def test_adagrad_memory_on_vectors_is_adagrad():
    params = {"b": PARAMS["b"], "s": PARAMS["s"]}
    ours = trajectory(optim.adagrad_memory(0.1, b1=0.0), params=params)
    assert_same(ours, trajectory(optax.adagrad(0.1), params=params))
