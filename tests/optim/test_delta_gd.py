"""Delta Gradient Descent (Eq. 56-57 of the paper) against the argmin it is defined by."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nl_jax import optim


def one_step(tx, w, g, **extra):
    params = {"w": jnp.asarray(w)}
    u, _ = tx.update({"w": jnp.asarray(g)}, tx.init(params), params, **extra)
    return np.asarray(optax.apply_updates(params, u)["w"])


def eq57(w, x, dy, eta):
    """Eq. 57 in the paper's layout (W: d_out x d_in, y = W x): W (I - eta' x x^T) - eta' dy x^T,
    eta' = eta / (1 + eta ||x||^2) (Sherman-Morrison; eta/(1+eta) for unit x). Returns our layout."""
    wp = w.T
    ep = eta / (1 + eta * x @ x)
    new = wp @ (np.eye(len(x)) - ep * np.outer(x, x)) - ep * np.outer(dy, x)
    return new.T


def test_one_token_with_its_input_is_eq57():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    x = (2.0 * rng.standard_normal(5)).astype(np.float32)  # not unit-norm: eta' = eta/(1+eta||x||^2)
    dy = rng.standard_normal(3).astype(np.float32)
    g = np.outer(x, dy)  # grad_W of a loss through y = x @ W
    got = one_step(optim.delta_gd(0.3), w, g, input_cov={"w": jnp.asarray(np.outer(x, x))})
    np.testing.assert_allclose(got, eq57(w, x, dy, 0.3), rtol=1e-5, atol=1e-6)
    # The gradient proxy S = G G^T/||G||^2 = x x^T/||x||^2 is a different rule for ||x|| != 1.
    proxy = one_step(optim.delta_gd(0.3), w, g)
    assert not np.allclose(proxy, got, atol=1e-3)


def test_gradient_proxy_is_eq57_for_a_unit_norm_token():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    x = rng.standard_normal(6).astype(np.float32)
    x /= np.linalg.norm(x)
    dy = rng.standard_normal(4).astype(np.float32)
    got = one_step(optim.delta_gd(0.5), w, np.outer(x, dy))
    np.testing.assert_allclose(got, eq57(w, x, dy, 0.5), rtol=1e-5, atol=1e-6)
    # ... and not plain SGD (the decay term is there).
    assert not np.allclose(got, w - 0.5 * np.outer(x, dy), atol=1e-3)


def test_batch_step_is_the_argmin_of_the_summed_regression():
    """W' = argmin sum_t 1/2 ||x_t^T W + dy_t||^2 + 1/(2 eta) ||W - W_t||^2, solved as least squares
    over the stacked system [X; I/sqrt(eta)] W = [-DY; W_t/sqrt(eta)]; layers of a stack independent."""
    rng = np.random.default_rng(2)
    eta = 0.2
    w = rng.standard_normal((2, 5, 3)).astype(np.float32)
    xs = rng.standard_normal((2, 7, 5)).astype(np.float32)
    dys = rng.standard_normal((2, 7, 3)).astype(np.float32)
    g = np.einsum("lti,lto->lio", xs, dys)
    cov = np.einsum("lti,ltj->lij", xs, xs)
    got = one_step(optim.delta_gd(eta), w, g, input_cov={"w": jnp.asarray(cov)})
    for layer in range(2):
        a = np.concatenate([xs[layer], np.eye(5) / np.sqrt(eta)]).astype(np.float64)
        b = np.concatenate([-dys[layer], w[layer] / np.sqrt(eta)]).astype(np.float64)
        ref = np.linalg.lstsq(a, b, rcond=None)[0]
        np.testing.assert_allclose(got[layer], ref, rtol=1e-4, atol=1e-5)


def test_vectors_take_a_plain_gradient_step_and_params_are_required():
    tx = optim.delta_gd(0.1)
    params = {"b": jnp.ones(4), "w": jnp.ones((3, 4))}
    g = {"b": jnp.arange(4.0), "w": jnp.ones((3, 4))}
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_array_equal(u["b"], -0.1 * g["b"])
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(g, tx.init(params))


def test_input_cov_passes_through_inject_hyperparams():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
    g = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
    cov = {"w": jnp.asarray(np.eye(4) * 2.0, jnp.float32)}
    ref, _ = optim.delta_gd(0.1).update(g, optim.delta_gd(0.1).init(params), params, input_cov=cov)
    itx = optax.inject_hyperparams(optim.delta_gd)(learning_rate=0.1)
    u, _ = jax.jit(itx.update)(g, itx.init(params), params, input_cov=cov)
    np.testing.assert_allclose(u["w"], ref["w"], rtol=1e-6)
    # S = 2 I: u = (G + 2 W) / (1 + 0.2), so not the proxy's update.
    np.testing.assert_allclose(ref["w"], -0.1 * (g["w"] + 2 * params["w"]) / 1.2, rtol=1e-5)
