"""Higher-order momentum (Eq. 51) and Generalized GD / Momentum (Eq. 59-60) against plain loops."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nl_jax import optim
from tests.optim.test_reductions import PARAMS, assert_same, grads_at, trajectory


def loop(params, steps, rule):
    """Plain numpy loop: ``rule(t, g, W_history)`` returns W_{t+1} for one leaf (history newest last)."""
    hist = {k: [np.asarray(v, np.float32)] for k, v in params.items()}
    out = []
    for t in range(steps):
        g = grads_at(params, t)
        for k in hist:
            hist[k].append(rule(t, np.asarray(g[k]), hist[k]))
        out.append({k: hist[k][-1] for k in hist})
    return out


def test_feature_momentum_is_eq51():
    """m <- alpha m + P(phi(g)) with phi(g) = g + 0.5 g^2 - 0.3 g^3 and P = 2 (optax.scale)."""
    coeffs, lr = (1.0, 0.5, -0.3), 0.01
    tx = optim.feature_momentum(lr, decay=0.8, coeffs=coeffs, preconditioner=optax.scale(2.0))
    ours = trajectory(tx, steps=5)
    m = {k: np.zeros(np.shape(v), np.float32) for k, v in PARAMS.items()}
    w = {k: np.asarray(v, np.float32) for k, v in PARAMS.items()}
    for t in range(5):
        g = grads_at(PARAMS, t)
        for k in w:
            gk = np.asarray(g[k])
            m[k] = 0.8 * m[k] + 2.0 * (gk + 0.5 * gk**2 - 0.3 * gk**3)
            w[k] = w[k] - lr * m[k]
        assert_same(ours[t], w, rtol=1e-5, atol=1e-6)
    # The feature map changes the trajectory (the test above would pass with phi = identity otherwise).
    plain = trajectory(optax.sgd(lr, momentum=0.8), steps=5)
    assert not np.allclose(np.asarray(ours[-1]["w"]), np.asarray(plain[-1]["w"]), atol=1e-3)


def test_generalized_gd_is_the_windowed_argmin():
    """W_{t+1} = sum_k lambda_k W_{t-k} - lr g_t (Eq. 59 with a proximal window; W_{<0} = W_0)."""
    lam, lr = (0.5, 0.3, 0.2), 0.05
    ours = trajectory(optim.generalized_gd(lr, weights=(5.0, 3.0, 2.0)), steps=6)

    def rule(t, g, hist):
        window = [hist[max(len(hist) - 1 - k, 0)] for k in range(3)]
        return sum(l * w for l, w in zip(lam, window)) - lr * g

    ref = loop(PARAMS, 6, rule)
    for o, r in zip(ours, ref):
        assert_same(o, r, rtol=1e-5, atol=1e-6)
    # A window of one (the current iterate only) is SGD, which this is not.
    sgd = trajectory(optax.sgd(lr), steps=6)
    assert not np.allclose(np.asarray(ours[-1]["w"]), np.asarray(sgd[-1]["w"]), atol=1e-3)


def test_generalized_momentum_is_the_windowed_argmin():
    """m_{t+1} = alpha sum_k lambda_k m_{t-k} + g_t (m_{<0} = 0), W <- W - lr m_{t+1}."""
    lam, lr, alpha = (0.6, 0.4), 0.02, 0.9
    ours = trajectory(optim.generalized_gd(lr, weights=lam, decay=alpha, form="momentum"), steps=6)
    w = {k: np.asarray(v, np.float32) for k, v in PARAMS.items()}
    ms = {k: [np.zeros_like(v), np.zeros_like(v)] for k, v in w.items()}  # newest first
    for t in range(6):
        g = grads_at(PARAMS, t)
        for k in w:
            new = alpha * (lam[0] * ms[k][0] + lam[1] * ms[k][1]) + np.asarray(g[k])
            ms[k] = [new, ms[k][0]]
            w[k] = w[k] - lr * new
        assert_same(ours[t], w, rtol=1e-5, atol=1e-6)


def test_generalized_gd_rejects_bad_weights():
    with pytest.raises(ValueError, match="non-negative"):
        optim.generalized_gd(0.1, weights=(1.0, -0.5))
    with pytest.raises(ValueError, match="form"):
        optim.generalized_gd(0.1, form="adam")


def test_generalized_gd_state_holds_the_window():
    params = {"w": jnp.ones((3, 2))}
    tx = optim.scale_by_generalized_gd(weights=(0.5, 0.3, 0.2))
    state = tx.init(params)
    assert len(state.history) == 2
    g = {"w": jnp.full((3, 2), 2.0)}
    u1, state = tx.update(g, state)
    u2, state = jax.jit(tx.update)(g, state)
    np.testing.assert_allclose(state.history[0]["w"], u2["w"])
    np.testing.assert_allclose(state.history[1]["w"], u1["w"])
    # u_2 = g - Lambda_1 u_1 with Lambda_1 = 0.3 + 0.2
    np.testing.assert_allclose(u2["w"], 2.0 - 0.5 * 2.0)
