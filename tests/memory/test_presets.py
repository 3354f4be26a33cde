"""DeltaNet, the gated delta rule, linear attention / RetNet, TTT, Titans and the self-modifying update,
each run through the chunked core, against its textbook recurrence written out here in float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.memory import ops
from nl_jax.memory.ops import presets
from tests.memory.inputs import fresh_seed, rel_err, unit

B, T, H, D, C = 2, 16, 2, 6, 4


def _data(seed):
    ks = jax.random.split(jax.random.key(seed), 8)
    q, k = unit(jax.random.normal(ks[0], (B, T, H, D))), unit(jax.random.normal(ks[1], (B, T, H, D)))
    v = jax.random.normal(ks[2], (B, T, H, D))
    gates = [jax.nn.sigmoid(jax.random.normal(ks[i], (B, T, H))) for i in (3, 4, 5)]
    s0 = 0.3 * jax.random.normal(ks[6], (B, H, D, D))
    return q, k, v, gates, s0


def _chunked(m, s0, q, k, v):
    state = ops.init_state(ops.LinearWeights(s0), momentum=m.rates.momentum is not None)
    y, final = ops.memory_chunked(m.spec, state, q, k, v, m.rates, chunk_size=C, read=m.read)
    return np.asarray(y), np.asarray(final.weights.w)


def _loop(step, s0, q, k, v, *gates):
    """Run step(S, S_boundary, q, k, v, *g) -> (S, o) per batch and head, in float64."""
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    q, k, v, s0 = f64(q), f64(k), f64(v), f64(s0)
    gates = [f64(g) for g in gates]
    out, finals = np.zeros_like(v), np.zeros_like(s0)
    for b in range(B):
        for h in range(H):
            s = s0[b, h].copy()
            boundary = s.copy()
            for t in range(T):
                s, out[b, t, h] = step(
                    s, boundary, q[b, t, h], k[b, t, h], v[b, t, h], *[g[b, t, h] for g in gates]
                )
                if (t + 1) % C == 0:
                    boundary = s.copy()
            finals[b, h] = s
    return out, finals


def _check(got, want, seed):
    assert rel_err(jnp.asarray(got[0]), jnp.asarray(want[0], np.float32)) < 1e-5, seed
    assert rel_err(jnp.asarray(got[1]), jnp.asarray(want[1], np.float32)) < 1e-5, seed


def test_delta_rule():
    seed = fresh_seed()
    q, k, v, (beta, _, _), s0 = _data(seed)

    def step(s, _, q, k, v, beta):  # S_t = S_{t-1} - beta (S_{t-1} k - v) k^T ; o = S_t q
        s = s - beta * np.outer(s @ k - v, k)
        return s, s @ q

    _check(_chunked(presets.delta_rule(beta), s0, q, k, v), _loop(step, s0, q, k, v, beta), seed)


def test_gated_delta_rule():
    seed = fresh_seed()
    q, k, v, (beta, alpha, _), s0 = _data(seed)

    def step(s, _, q, k, v, alpha, beta):  # S_t = alpha S (I - beta k k^T) + beta v k^T
        s = alpha * s @ (np.eye(D) - beta * np.outer(k, k)) + beta * np.outer(v, k)
        return s, s @ q

    _check(
        _chunked(presets.gated_delta_rule(alpha, beta), s0, q, k, v),
        _loop(step, s0, q, k, v, alpha, beta),
        seed,
    )


def test_retention_linear_attention():
    seed = fresh_seed()
    q, k, v, _, s0 = _data(seed)
    decay = jnp.broadcast_to(jnp.array([0.9, 0.6]), (B, T, H))  # RetNet: a fixed decay per head

    def step(s, _, q, k, v, gamma):
        s = gamma * s + np.outer(v, k)
        return s, s @ q

    _check(
        _chunked(presets.linear_attention(jnp.ones((B, T, H)), decay), s0, q, k, v),
        _loop(step, s0, q, k, v, decay),
        seed,
    )


def test_ttt_linear_minibatch_gd():
    seed = fresh_seed()
    q, k, v, (lr, _, _), s0 = _data(seed)

    def step(s, boundary, q, k, v, lr):  # gradient at the mini-batch start; dual-form read W_t q
        s = s - lr * np.outer(boundary @ k - v, k)
        return s, s @ q

    _check(_chunked(presets.ttt(lr), s0, q, k, v), _loop(step, s0, q, k, v, lr), seed)


def test_self_modifying_matrix_is_paper_eq_93():
    seed = fresh_seed()
    q, k, v, (eta, alpha, _), s0 = _data(seed)
    eta = 0.5 * eta

    def step(s, boundary, q, k, v, eta, alpha):
        # M_t = M_{t-1} (alpha I - eta k k^T) - eta (M_B k - v_hat) k^T ; read before the update
        o = s @ q
        s = s @ (alpha * np.eye(D) - eta * np.outer(k, k)) - eta * np.outer(boundary @ k - v, k)
        return s, o

    m = presets.self_modifying(eta, alpha, structure="linear", read="per_token")
    _check(_chunked(m, s0, q, k, v), _loop(step, s0, q, k, v, eta, alpha), seed)


@pytest.mark.parametrize("structure", ["linear", "mlp"])
def test_titans_lmm(structure):
    """Titans with chunk-start gradients (its parallel training form), momentum and forgetting."""
    seed = fresh_seed()
    q, k, v, (theta, forget, eta), _ = _data(seed)
    theta, forget = 0.5 * theta, 0.2 * forget
    m = presets.titans(theta, forget, eta, structure=structure)
    w0 = ops.init_weights(m.spec, jax.random.key(seed), (B, H), D, hidden=5, scale=0.3)
    state = ops.init_state(w0, momentum=True)
    y, final = ops.memory_chunked(m.spec, state, q, k, v, m.rates, chunk_size=C, read=m.read)

    loss = lambda w, k, v: 0.5 * jnp.sum((ops.apply(m.spec, w, k[None])[0] - v) ** 2)  # noqa: E731
    grad = jax.jit(jax.grad(loss))
    ys = np.zeros(v.shape, np.float32)
    for b in range(B):
        for h in range(H):
            w = jax.tree.map(lambda x: x[b, h], w0)
            s = jax.tree.map(jnp.zeros_like, w)
            boundary = w
            for t in range(T):
                g = grad(boundary, k[b, t, h], v[b, t, h])
                s = jax.tree.map(lambda s, g: eta[b, t, h] * s - theta[b, t, h] * g, s, g)  # S_t
                w = jax.tree.map(lambda w, s: (1 - forget[b, t, h]) * w + s, w, s)  # M_t
                ys[b, t, h] = ops.apply(m.spec, w, q[b, t, h][None])[0]  # y_t = M_t(q_t)
                if (t + 1) % C == 0:
                    boundary = w
            for got, want in zip(jax.tree.leaves(final.weights), jax.tree.leaves(w)):
                assert rel_err(got[b, h], want) < 1e-5, seed
    assert rel_err(y, jnp.asarray(ys)) < 1e-5, seed


def test_deep_linear_attention_is_hebbian_gd_on_an_mlp():
    """DLA: M_t = alpha_t M_{t-1} - eta_t d(-<M(k_t), v_t>)/dM at the chunk-start state, read M_t(q_t);
    M(z) = z + W1 silu(W2 z), its gradient written out by hand in float64."""
    seed = fresh_seed()
    q, k, v, (eta, alpha, _), _ = _data(seed)
    m = presets.deep_linear_attention(eta, alpha)
    w0 = ops.init_weights(m.spec, jax.random.key(seed), (B, H), D, hidden=5, scale=0.3)
    state = ops.init_state(w0, momentum=False)
    y, final = ops.memory_chunked(m.spec, state, q, k, v, m.rates, chunk_size=C, read=m.read)

    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    q, k, v, eta, alpha = (f64(x) for x in (q, k, v, eta, alpha))
    for b in range(B):
        for h in range(H):
            w1, w2 = f64(w0.w1[b, h]), f64(w0.w2[b, h])
            b1, b2 = w1, w2
            for t in range(T):
                z = b2 @ k[b, t, h]
                g1 = -np.outer(v[b, t, h], z * sig(z))  # -v silu(W2 k)^T
                g2 = -np.outer((b1.T @ v[b, t, h]) * sig(z) * (1 + z * (1 - sig(z))), k[b, t, h])
                w1 = alpha[b, t, h] * w1 - eta[b, t, h] * g1
                w2 = alpha[b, t, h] * w2 - eta[b, t, h] * g2
                zq = w2 @ q[b, t, h]
                want = q[b, t, h] + w1 @ (zq * sig(zq))
                assert rel_err(y[b, t, h], jnp.asarray(want, jnp.float32)) < 1e-5, seed
                if (t + 1) % C == 0:
                    b1, b2 = w1, w2
            assert rel_err(final.weights.w1[b, h], jnp.asarray(w1, jnp.float32)) < 1e-5, seed
            assert rel_err(final.weights.w2[b, h], jnp.asarray(w2, jnp.float32)) < 1e-5, seed
