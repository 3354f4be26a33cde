"""RMSNorm and RoPE against plain numpy formulas."""

import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.layers import RMSNorm, apply_rope


@pytest.mark.parametrize("shape", [(3, 8), (2, 5, 16)])
def test_rmsnorm_matches_numpy(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32) * 3.0
    norm = RMSNorm(shape[-1], eps=1e-5)
    scale = rng.normal(size=shape[-1]).astype(np.float32)
    norm.scale[...] = jnp.asarray(scale)
    want = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(norm(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)
    assert norm.scale.get_metadata()["out_sharding"] == ("norm",)


def test_rmsnorm_keeps_input_dtype():
    x = jnp.ones((2, 4), jnp.bfloat16)
    assert RMSNorm(4)(x).dtype == jnp.bfloat16


def _rope_numpy(x, pos, theta):
    """Complex-number form: pair (x_i, x_{i+D/2}) is z = x_i + 1j x_{i+D/2}, rotated by pos*f_i."""
    d = x.shape[-1]
    f = theta ** (-np.arange(0, d, 2) / d)
    z = x[..., : d // 2] + 1j * x[..., d // 2 :]
    z = z * np.exp(1j * pos[..., :, None, None] * f)  # [.., T, 1, D/2] against x [.., T, H, D/2]
    return np.concatenate([z.real, z.imag], axis=-1)


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_matches_numpy(theta):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 3, 8)).astype(np.float32)
    pos = np.arange(7) + 5
    got = apply_rope(jnp.asarray(x), jnp.asarray(pos), theta)
    np.testing.assert_allclose(got, _rope_numpy(x, pos, theta), rtol=1e-5, atol=1e-5)
    # Per-batch positions [B, T] give the same as shared ones.
    got_b = apply_rope(jnp.asarray(x), jnp.asarray(np.stack([pos, pos])), theta)
    np.testing.assert_allclose(got_b, got, rtol=1e-6, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)).astype(np.float32))

    def score(m, n):
        return float(jnp.sum(apply_rope(q, jnp.array([m])) * apply_rope(k, jnp.array([n]))))

    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rope(jnp.ones((1, 2, 1, 5)), jnp.arange(2))
