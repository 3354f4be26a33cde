"""Mamba: chunked selective scan == token-by-token reference (outputs, final state, gradients),
the layer's decode step == its full forward, streaming == one call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nl_jax.mixers.mamba import (
    Mamba,
    selective_scan_chunked,
    selective_scan_naive,
)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def _scan_inputs(key, b, t, d, n):
    k = jax.random.split(key, 7)
    x = jax.random.normal(k[0], (b, t, d))
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, t, d)) - 1.0)
    a = -jnp.exp(jax.random.normal(k[2], (d, n)))
    bm = jax.random.normal(k[3], (b, t, n))
    cm = jax.random.normal(k[4], (b, t, n))
    dm = jax.random.normal(k[5], (d,))
    h0 = jax.random.normal(k[6], (b, d, n))
    return x, dt, a, bm, cm, dm, h0


@pytest.mark.parametrize("b, t, d, n, chunk", [(1, 16, 4, 2, 1), (2, 37, 6, 4, 8)])
def test_chunked_scan_equals_reference_outputs_state_and_gradients(b, t, d, n, chunk):
    args = _scan_inputs(jax.random.key(t * 31 + d), b, t, d, n)
    w_y = jax.random.normal(jax.random.key(1), (b, t, d))
    w_h = jax.random.normal(jax.random.key(2), (b, d, n))

    def value_and_grads(fn):
        def loss(*a):
            y, h = fn(*a)
            return jnp.sum(y * w_y) + jnp.sum(h * w_h), (y, h)

        return jax.grad(loss, argnums=tuple(range(7)), has_aux=True)

    chunked = lambda *a: selective_scan_chunked(*a, chunk_size=chunk, remat=True)  # noqa: E731
    both = jax.jit(lambda *a: (value_and_grads(selective_scan_naive)(*a), value_and_grads(chunked)(*a)))
    (g_ref, (y_ref, h_ref)), (g, (y, h)) = both(*args)
    assert _rel(y, y_ref) < 1e-5 and _rel(h, h_ref) < 1e-5
    for name, gi, gr in zip(("x", "dt", "A", "B", "C", "D", "h0"), g, g_ref):
        assert _rel(gi, gr) < 1e-5, name


def test_scan_rejects_mismatched_shapes():
    x, dt, bm, cm = jnp.zeros((2, 8, 4)), jnp.zeros((2, 8, 4)), jnp.zeros((2, 8, 3)), jnp.zeros((2, 8, 3))
    a, dm, h0 = jnp.zeros((4, 3)), jnp.zeros((4,)), jnp.zeros((2, 4, 3))
    with pytest.raises(ValueError, match="selective scan shapes"):
        selective_scan_chunked(x, dt, a, bm[:, :4], cm, dm, h0)
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(x, dt, a, bm, cm, dm, h0, chunk_size=0)


def _layer(seed=0, **kw):
    layer = Mamba(16, d_state=4, chunk_size=8, rngs=nnx.Rngs(seed), **kw)
    # Larger weights than the 0.02 init, so that the scan, gate and conv all matter in the checks.
    params = nnx.state(layer, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed + 100), 32))
    nnx.update(
        layer,
        jax.tree.map(
            lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape) if p.ndim == 2 else p, params
        ),
    )
    return layer


def test_layer_chunked_equals_recurrent():
    # Everything but the scan is shared code; the scan's gradients are checked above.
    layer = _layer()
    u = jax.random.normal(jax.random.key(3), (2, 21, 16))
    y_c, _ = layer(u)
    y_r, _ = layer(u, form="recurrent")
    assert _rel(y_c, y_r) < 1e-5


def test_layer_decode_step_by_step_equals_full_forward():
    layer = _layer(seed=1)
    u = jax.random.normal(jax.random.key(4), (2, 13, 16))
    full, _ = layer(u, form="recurrent")
    state = layer.init_state(2)
    step = jax.jit(lambda x, s: layer(x, s, form="recurrent"))
    outs = []
    for i in range(u.shape[1]):
        y, state = step(u[:, i : i + 1], state)
        outs.append(y)
    assert _rel(jnp.concatenate(outs, 1), full) < 1e-5
    _, state_full = layer(u, layer.init_state(2))
    np.testing.assert_allclose(state.ssm, state_full.ssm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.conv, state_full.conv, rtol=1e-6)


@pytest.mark.parametrize("split", [5, 16])
def test_streaming_two_calls_equal_one(split):
    layer = _layer(seed=2)
    u = jax.random.normal(jax.random.key(5), (2, 24, 16))
    y, s = layer(u, layer.init_state(2))
    y1, s1 = layer(u[:, :split], layer.init_state(2))
    y2, s2 = layer(u[:, split:], s1)
    assert _rel(jnp.concatenate([y1, y2], 1), y) < 1e-5
    assert _rel(s2.ssm, s.ssm) < 1e-5
    np.testing.assert_allclose(s2.conv, s.conv, rtol=1e-6)


def test_layer_init_and_bad_form():
    layer = Mamba(8, d_state=4, rngs=nnx.Rngs(0))
    a = -jnp.exp(layer.A_log[...])
    np.testing.assert_allclose(a[3], -jnp.arange(1, 5.0), rtol=1e-6)  # S4D-real
    dt = jax.nn.softplus(layer.dt_bias[...])
    assert float(dt.min()) >= 1e-4 - 1e-9 and float(dt.max()) <= 0.1 + 1e-6
    assert layer.dt_rank == 1 and layer.d_inner == 16
    with pytest.raises(ValueError, match="form must be one of"):
        layer(jnp.zeros((1, 4, 8)), form="parallel")


def test_reset_restarts_the_state_in_both_scan_forms():
    """reset [B, T]: the flagged token forgets the state, so the scan from it on equals a scan of
    the rest of the row from a zero state; the chunked form (reset inside and at the start of a
    chunk) equals the token-by-token one."""
    b, t, d, n, cut = 2, 21, 5, 3, 8  # row 0 restarts at a chunk start (chunks of 8), row 1 inside one
    x, dt, a, bm, cm, dm, h0 = _scan_inputs(jax.random.key(7), b, t, d, n)
    reset = jnp.zeros((b, t), bool).at[0, cut].set(True).at[1, 13].set(True)
    y_ref, h_ref = selective_scan_naive(x, dt, a, bm, cm, dm, h0, reset)
    y, h = selective_scan_chunked(x, dt, a, bm, cm, dm, h0, reset, chunk_size=8)
    assert _rel(y, y_ref) < 1e-5 and _rel(h, h_ref) < 1e-5
    for row, start in ((0, cut), (1, 13)):
        rest = lambda z: z[row : row + 1, start:]  # noqa: E731
        zero = jnp.zeros((1, d, n))
        y_alone, h_alone = selective_scan_naive(rest(x), rest(dt), a, rest(bm), rest(cm), dm, zero)
        assert _rel(y_ref[row : row + 1, start:], y_alone) < 1e-5 and _rel(h_ref[row : row + 1], h_alone) < 1e-5
    assert _rel(y_ref[:, :cut], selective_scan_naive(x, dt, a, bm, cm, dm, h0)[0][:, :cut]) < 1e-6
