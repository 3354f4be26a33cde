"""M3 (Section 7.2 of the paper) against a plain python loop of Algorithm 1, in both forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nl_jax import optim
from tests.optim.test_reductions import _reference_ns

SHAPES = {"w": (6, 8), "stack": (2, 4, 6), "b": (5,)}


def sigma(x):
    """NS on matrices (per layer for stacked ones), identity on vectors: numpy reference."""
    if x.ndim == 1:
        return x
    if x.ndim == 2:
        return _reference_ns(x)
    return np.stack([_reference_ns(xi) for xi in x])


def algorithm1(params, grads, lr, b1, b2, b3, alpha, eps, f, form):
    """Algorithm 1 of the paper as printed (k: low-frequency loop, t: inner loop)."""
    w = {k: np.asarray(v, np.float32).copy() for k, v in params.items()}
    n = len(grads)
    for name in w:
        m1 = np.zeros_like(w[name])
        m2 = np.zeros_like(w[name])
        v = np.zeros_like(w[name])
        o2 = np.zeros_like(w[name])
        for k in range(-(-n // f)):
            if k > 0:
                chunk = sum(grads[i][name] for i in range((k - 1) * f, k * f))
                if form == "accumulate":
                    m2 = m2 + b3 * chunk
                    o2 = sigma(m2)
                else:
                    m2 = b3 * m2 + (1 - b3) * chunk / f
                    o2 = sigma(m2 / (1 - b3**k))
            for t in range(k * f, min((k + 1) * f, n)):
                g = grads[t][name]
                if form == "accumulate":
                    m1 = m1 + b1 * g
                    v = v + b2 * g * g
                    o1, v_hat = sigma(m1), v
                else:
                    m1 = b1 * m1 + (1 - b1) * g
                    v = b2 * v + (1 - b2) * g * g
                    o1, v_hat = sigma(m1 / (1 - b1 ** (t + 1))), v / (1 - b2 ** (t + 1))
                w[name] = w[name] - lr * (o1 + alpha * o2) / (np.sqrt(v_hat) + eps)
    return w


@pytest.mark.parametrize("form", ["accumulate", "ema"])
def test_m3_matches_algorithm1(form):
    rng = np.random.default_rng(5)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(8)]
    hp = dict(b1=0.9, b2=0.99, b3=0.8, alpha=0.7, eps=1e-3)
    tx = optim.m3(0.01, period=3, form=form, **hp)

    @jax.jit
    def run(params, grads):
        def body(carry, g):
            p, s = carry
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, tx.init(params)), grads)[0]

    stacked = jax.tree.map(lambda *g: np.stack(g), *grads)
    ours, state = run(jax.tree.map(jnp.asarray, params), stacked)
    ref = algorithm1(params, grads, 0.01, f=3, form=form, **hp)
    for k in SHAPES:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-6)
    assert int(state[0].count) == 8
    # 8 steps = two full chunks of 3 folded into M2; the last 2 gradients wait in grad_sum.
    np.testing.assert_allclose(state[0].grad_sum["b"], grads[6]["b"] + grads[7]["b"], rtol=1e-6)


def test_m3_slow_memory_changes_only_at_chunk_boundaries():
    params = {"w": jnp.ones((4, 6))}
    tx = optim.scale_by_m3(period=4)
    state = tx.init(params)
    update = jax.jit(tx.update)
    seen = []
    for i in range(9):
        g = {"w": jnp.full((4, 6), float(i + 1)) + jnp.eye(4, 6)}
        _, state = update(g, state, params)
        seen.append(np.asarray(state.slow_out["w"]).copy())
    changed = [i for i in range(1, 9) if not np.array_equal(seen[i], seen[i - 1])]
    assert changed == [3, 7]  # after steps 4 and 8
    assert not np.any(seen[2]) and np.any(seen[3])


def test_mu_dtype_applies_to_the_momenta_only():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    state = optim.scale_by_m3(mu_dtype=jnp.bfloat16).init(params)
    assert {x.dtype for x in jax.tree.leaves((state.mu, state.mu_slow))} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves((state.nu, state.grad_sum, state.slow_out))} == {
        jnp.dtype(jnp.float32)
    }


def test_m3_without_slow_memory_is_adam_normalised_muon():
    """alpha = 0, form='ema': u = NS(M1_hat) / (sqrt(V_hat) + eps), M1/V Adam's debiased moments
    (NS per matrix, identity on vectors); written from the equations, not from Algorithm 1's loop."""
    rng = np.random.default_rng(9)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(7)]
    b1, b2, eps, lr = 0.9, 0.99, 1e-3, 0.01
    tx = optim.m3(lr, b1=b1, b2=b2, alpha=0.0, eps=eps, period=2)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    update = jax.jit(tx.update)
    w = {k: v.astype(np.float64) for k, v in params.items()}
    m1 = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    for t, g in enumerate(grads, start=1):
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
        for k in w:
            m1[k] = b1 * m1[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            m_hat, v_hat = m1[k] / (1 - b1**t), v[k] / (1 - b2**t)
            if m_hat.ndim == 1:
                o = m_hat
            else:
                o = np.stack([_reference_ns(x) for x in m_hat.reshape((-1,) + m_hat.shape[-2:])])
                o = o.reshape(m_hat.shape)
            w[k] = w[k] - lr * o / (np.sqrt(v_hat) + eps)
        for k in w:
            np.testing.assert_allclose(p[k], w[k], rtol=1e-5, atol=1e-5)
    # The slow memory is live (period 2, 7 steps): alpha = 1 is a different trajectory.
    with_slow = optim.m3(lr, b1=b1, b2=b2, alpha=1.0, eps=eps, period=2)
    q, s2 = jax.tree.map(jnp.asarray, params), with_slow.init(p)
    for g in grads:
        u, s2 = with_slow.update(g, s2, q)
        q = optax.apply_updates(q, u)
    assert not np.allclose(np.asarray(q["w"]), np.asarray(p["w"]), atol=1e-3)
