"""Memora's KL-retention update (nl_jax/memory/ops/memora.py): the chunked form equals the
token-by-token reference (outputs, final state, gradients), decoding equals both, the state stays on
the scaled simplex, and each chunk hands on the exact per-token KL steps, written out in float64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.memory import ops
from nl_jax.memory.ops import memora
from tests.memory.inputs import fresh_seed, max_tree_rel_err, rel_err, unit

B, T, H, D, DH, C, SCALE = 2, 16, 2, 6, 5, 4, 2.0


def _data(seed, structure):
    ks = jax.random.split(jax.random.key(seed), 6)
    q, k = unit(jax.random.normal(ks[0], (B, T, H, D))), unit(jax.random.normal(ks[1], (B, T, H, D)))
    v = jax.random.normal(ks[2], (B, T, H, D))
    gate = lambda key: jax.nn.sigmoid(jax.random.normal(key, (B, T, H)))  # noqa: E731
    rates = ops.Rates(lr=0.5 * gate(ks[3]), retention=0.5 + 0.5 * gate(ks[4]))
    spec = ops.MemorySpec(structure, "l2", "gelu")
    logits = ops.init_weights(spec, ks[5], (B, H), D, hidden=DH, scale=1.0)
    return spec, memora.init_state(logits, SCALE), q, k, v, rates


def _decode(spec, state, q, k, v, rates):
    ys = []
    for t in range(q.shape[1]):
        at = lambda x: x[:, t]  # noqa: E731
        y, state = memora.memora_recurrent(
            spec, state, at(q), at(k), at(v), jax.tree.map(at, rates), chunk_size=C, scale=SCALE
        )
        ys.append(y)
    return jnp.stack(ys, 1), state


@pytest.mark.parametrize("structure", ["linear", "mlp"])
def test_chunked_equals_naive_and_decoding(structure):
    seed = fresh_seed()
    spec, state, q, k, v, rates = _data(seed, structure)
    y_c, s_c = memora.memora_chunked(spec, state, q, k, v, rates, chunk_size=C, scale=SCALE)
    y_n, s_n = memora.memora_naive(spec, state, q, k, v, rates, chunk_size=C, scale=SCALE)
    y_r, s_r = _decode(spec, state, q, k, v, rates)
    assert rel_err(y_c, y_n) < 1e-5 and rel_err(y_r, y_n) < 1e-5, seed
    # States at 1e-4: float32 rounding passes through each chunk's log / softmax (2.6e-5 seen over
    # a handful of seeds); a wrong term of the update is orders of magnitude larger.
    assert max_tree_rel_err(s_c, s_n) < 1e-4 and max_tree_rel_err(s_r, s_n) < 1e-4, seed
    assert int(s_n.step) == 0
    for w, log_w in zip(s_c.weights, s_c.logits):  # on the scaled simplex (entries may underflow to 0)
        assert float(jnp.min(w)) >= 0 and bool(jnp.all(jnp.isfinite(log_w))), seed
        np.testing.assert_allclose(jnp.sum(w, -1), SCALE, rtol=1e-5, err_msg=f"seed {seed}")


@pytest.mark.parametrize("structure", ["linear", "mlp"])
def test_chunked_gradients_equal_naive(structure):
    """The outer gradient wrt inputs, rates and the initial logits, through the softmax steps."""
    seed = fresh_seed()
    spec, state, q, k, v, rates = _data(seed, structure)
    logits0 = jax.tree.map(jnp.log, state.weights)
    proj = jax.random.normal(jax.random.key(seed + 1), (B, T, H, D))

    def loss(form, logits, q, k, v, rates):
        y, s = form(spec, memora.init_state(logits, SCALE), q, k, v, rates, chunk_size=C, scale=SCALE)
        return jnp.sum(y * proj) + sum(jnp.sum(jnp.sin(w)) for w in jax.tree.leaves(s.weights))

    args = (logits0, q, k, v, rates)
    g_c = jax.grad(functools.partial(loss, memora.memora_chunked), argnums=(0, 1, 2, 3, 4))(*args)
    g_n = jax.grad(functools.partial(loss, memora.memora_naive), argnums=(0, 1, 2, 3, 4))(*args)
    assert max_tree_rel_err(g_c, g_n) < 1e-4, seed


def test_each_chunk_hands_on_the_per_token_kl_steps():
    """Linear memory in float64: per token W <- c softmax(alpha log W - eta (W_B k - v) k^T) over a
    chunk, gradients at its start W_B, gives the state the op hands to the next chunk; the reads are
    the linear approximation W <- alpha W - eta g."""
    seed = fresh_seed()
    spec, state, q, k, v, rates = _data(seed, "linear")
    y, final = memora.memora_chunked(spec, state, q, k, v, rates, chunk_size=C, scale=SCALE)
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    q, k, v, lr, ret = (f64(x) for x in (q, k, v, rates.lr, rates.retention))
    w0 = f64(state.weights.w)
    for b in range(B):
        for h in range(H):
            w_b = w0[b, h]
            for start in range(0, T, C):
                exact, lin = w_b.copy(), w_b.copy()
                for t in range(start, start + C):
                    g = np.outer(w_b @ k[b, t, h] - v[b, t, h], k[b, t, h])
                    z = ret[b, t, h] * np.log(exact) - lr[b, t, h] * g
                    z = np.exp(z - z.max(-1, keepdims=True))
                    exact = SCALE * z / z.sum(-1, keepdims=True)
                    lin = ret[b, t, h] * lin - lr[b, t, h] * g
                    assert rel_err(y[b, t, h], lin @ q[b, t, h]) < 1e-5, seed
                w_b = exact
            assert rel_err(final.weights.w[b, h], w_b) < 1e-5, seed


def test_bad_rates_and_states_are_rejected():
    spec, state, q, k, v, rates = _data(0, "linear")
    with pytest.raises(ValueError, match="drop momentum"):
        memora.memora_chunked(
            spec, state, q, k, v, rates._replace(momentum=rates.lr), chunk_size=C, scale=SCALE
        )
    with pytest.raises(TypeError, match="needs a MemoraState"):
        memora.memora_naive(
            spec, ops.init_state(state.weights, False), q, k, v, rates, chunk_size=C, scale=SCALE
        )
    with pytest.raises(ValueError, match="does not divide"):
        cut = jax.tree.map(lambda x: x[:, :5], (q, k, v, rates))
        memora.memora_chunked(spec, state, *cut, chunk_size=C, scale=SCALE)
