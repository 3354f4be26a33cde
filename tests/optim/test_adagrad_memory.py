"""AdaGrad with momentum as an outer-product memory (Eq. 106-111 of the paper) against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nl_jax import optim
from tests.optim.test_reductions import PARAMS, assert_same, grads_at, trajectory


def inv_sqrt(h):
    """h^{-1/2} of a symmetric positive definite matrix (numpy eigh, float64)."""
    e, v = np.linalg.eigh(h.astype(np.float64))
    return (v / np.sqrt(e)) @ v.T


def test_matrices_are_full_matrix_adagrad_with_momentum():
    """Paper layout g: d_out x d_in: M~ <- b1 M~ + g, H <- b2 H + g g^T, W <- W - lr H^{-1/2} M~."""
    b1, b2, h0, eps, lr = 0.8, 0.95, 0.1, 1e-7, 0.05
    params = {"w": PARAMS["w"], "stack": PARAMS["stack"]}
    ours = trajectory(optim.adagrad_memory(lr, b1, b2, h0, eps), steps=4, params=params)
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mats = {k: v.reshape((-1,) + v.shape[-2:]) for k, v in w.items()}
    mom = {k: np.zeros_like(v) for k, v in mats.items()}
    key = {k: np.stack([h0 * np.eye(v.shape[-1])] * v.shape[0]) for k, v in mats.items()}
    for t in range(4):
        g = grads_at(params, t)
        for k in w:
            gk = np.asarray(g[k], np.float64).reshape(mats[k].shape)
            for layer in range(gk.shape[0]):
                gp = gk[layer].T  # paper layout
                mom[k][layer] = b1 * mom[k][layer] + gk[layer]
                key[k][layer] = b2 * key[k][layer] + gp @ gp.T
                precond = inv_sqrt(key[k][layer] + eps * np.eye(gp.shape[0]))
                mats[k][layer] = mats[k][layer] - lr * (precond @ mom[k][layer].T).T
        assert_same(ours[t], {k: v.reshape(w[k].shape) for k, v in mats.items()}, rtol=2e-4, atol=2e-5)
    # The diagonal (element-wise) AdaGrad is a different rule on matrices.
    elementwise = lambda p: jax.tree.map(lambda _: None, p)  # noqa: E731
    diag = trajectory(optim.adagrad_memory(lr, b1, b2, h0, eps, dims=elementwise), steps=4, params=params)
    assert not np.allclose(np.asarray(ours[-1]["w"]), np.asarray(diag[-1]["w"]), atol=1e-3)


def test_key_memory_is_stored_with_the_parameter_rank():
    params = {"w": jnp.zeros((3, 5)), "stack": jnp.zeros((2, 3, 5)), "b": jnp.zeros(5)}
    state = optim.scale_by_adagrad_memory(initial_accumulator_value=0.5).init(params)
    assert state.nu["w"].shape == (5, 5) and state.nu["stack"].shape == (2, 5, 5)
    np.testing.assert_array_equal(state.nu["stack"][1], 0.5 * np.eye(5))
    np.testing.assert_array_equal(state.nu["b"], np.full(5, 0.5))
