"""Newton-Schulz nonlinearity (Eq. 52 of the paper)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nl_jax import optim
from nl_jax.optim.newton_schulz import ANCHORED_ZETA


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (2, 8, 8)])
def test_cubic_newton_schulz_converges_to_the_polar_factor(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    out = np.asarray(optim.newton_schulz(jnp.asarray(x), ns_steps=60, ns_coeffs="cubic"))
    for xi, oi in zip(x.reshape((-1,) + shape[-2:]), out.reshape((-1,) + shape[-2:])):
        u, _, vt = np.linalg.svd(xi, full_matrices=False)
        np.testing.assert_allclose(oi, u @ vt, atol=2e-4)


def test_quintic_newton_schulz_singular_values_in_muon_band():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((16, 32)), jnp.float32)
    s = np.linalg.svd(np.asarray(optim.newton_schulz(x, ns_steps=5)), compute_uv=False)
    assert s.min() > 0.5 and s.max() < 1.3, s


def test_scale_by_newton_schulz_vectors_and_shape_scale():
    rng = np.random.default_rng(3)
    upd = {
        "w": jnp.asarray(rng.standard_normal((4, 16)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal((9,)), jnp.float32),
    }
    out, _ = optim.scale_by_newton_schulz(shape_scale="width").update(upd, optax.EmptyState())
    # vector: its 1 x n polar factor b/||b|| times the width scale sqrt(n) -> unit RMS
    np.testing.assert_allclose(np.sqrt(np.mean(np.square(out["b"]))), 1.0, rtol=1e-5)
    ref = optim.newton_schulz(upd["w"]) * 2.0  # sqrt(max(1, 16 / 4))
    np.testing.assert_allclose(out["w"], ref, rtol=1e-6)
    ident, _ = optim.scale_by_newton_schulz(vector_rule="identity").update(upd, optax.EmptyState())
    np.testing.assert_array_equal(ident["b"], upd["b"])


def test_traced_ns_steps_matches_static():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((5, 7)), jnp.float32)
    np.testing.assert_allclose(
        optim.newton_schulz(x, jnp.asarray(3)), optim.newton_schulz(x, 3), rtol=1e-5, atol=1e-6
    )


def _anchored_reference(g, steps, zeta, eps=1e-7):
    """Eq. 44 as written: O <- O - zeta (O - g + 2 O (O^T O - I)), O_0 = g (g Frobenius-normalised)."""
    g = np.asarray(g, np.float64)
    g = g / (np.linalg.norm(g) + eps)
    o = g.copy()
    for _ in range(steps):
        o = o - zeta * (o - g + 2 * o @ (o.T @ o - np.eye(o.shape[1])))
    return o


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_anchored_preset_is_eq44(shape):
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    ours = np.asarray(optim.newton_schulz(jnp.asarray(x), ns_steps=7, ns_coeffs="anchored"))
    np.testing.assert_allclose(ours, _anchored_reference(x, 7, ANCHORED_ZETA), rtol=1e-4, atol=1e-5)
    # The textbook cubic (no anchor) is another iteration.
    cubic = np.asarray(optim.newton_schulz(jnp.asarray(x), ns_steps=7, ns_coeffs="cubic"))
    assert not np.allclose(ours, cubic, atol=1e-3)


def test_anchored_fixed_point_keeps_the_input_singular_values():
    """Converged Eq. 44: each singular value o solves 2 o^3 - o = s (s: the normalised input's)."""
    x = np.random.default_rng(6).standard_normal((5, 8)).astype(np.float32)
    o = np.asarray(optim.anchored_newton_schulz(jnp.asarray(x), ns_steps=300, zeta=0.2))
    s = np.linalg.svd(x / np.linalg.norm(x), compute_uv=False)
    so = np.linalg.svd(o, compute_uv=False)
    np.testing.assert_allclose(2 * so**3 - so, s, atol=1e-4)
    assert so.min() > 0.7 and so.max() < 1.0  # between 1/sqrt(2) and 1: not the polar factor
