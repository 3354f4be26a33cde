"""Attention: naive softmax reference, causality, exact sliding-window masks, KV-cache decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nl_jax.mixers import (
    Attention,
    attention_mask,
    causal_attention,
    dot_product_attention,
    local_attention,
    segment_mask,
)
from tests.memory.inputs import fresh_seed


def _naive_attention(q, k, v, window):
    """One query at a time over the visible keys, in float64 numpy."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    out = np.zeros_like(q, dtype=np.float64)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // kvh)  # query head hi reads kv head kh
            for i in range(t):
                lo = 0 if not window else max(0, i - window + 1)
                s = q[bi, i, hi] @ k[bi, lo : i + 1, kh].T / np.sqrt(d)
                p = np.exp(s - s.max())
                out[bi, i, hi] = (p / p.sum()) @ v[bi, lo : i + 1, kh]
    return out


@pytest.mark.parametrize("t,h,kvh,window", [(9, 4, 4, 0), (9, 4, 2, 0), (12, 6, 2, 4), (5, 2, 1, 1)])
def test_dot_product_attention_matches_naive(t, h, kvh, window):
    rng = np.random.default_rng(t + h + kvh + window)
    q = rng.normal(size=(2, t, h, 8)).astype(np.float32)
    k = rng.normal(size=(2, t, kvh, 8)).astype(np.float32)
    v = rng.normal(size=(2, t, kvh, 8)).astype(np.float32)
    pos = jnp.arange(t)
    got = dot_product_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), attention_mask(pos, pos, window)
    )
    np.testing.assert_allclose(got, _naive_attention(q, k, v, window), rtol=1e-5, atol=1e-5)


def test_attention_mask_exact():
    pos = jnp.arange(6)
    full = np.tril(np.ones((6, 6), bool))
    np.testing.assert_array_equal(attention_mask(pos, pos, 0), full)
    win = np.array([[0 <= i - j < 3 for j in range(6)] for i in range(6)])
    np.testing.assert_array_equal(attention_mask(pos, pos, 3), win)
    # Negative key positions are empty cache slots.
    np.testing.assert_array_equal(
        attention_mask(jnp.array([2]), jnp.array([-1, 0, 2, 3]), 0), [[False, True, True, False]]
    )


def _layer(window=0, kvh=2, dtype=jnp.float32):
    return Attention(16, 4, kvh, 8, sliding_window=window, dtype=dtype, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("window", [0, 3])
def test_token_dependencies_are_exactly_the_mask(window):
    """Output i depends on input j iff j is visible to i: causality and the window, exactly."""
    layer = _layer(window)
    x = jax.random.normal(jax.random.key(0), (10, 16))
    jac = jax.jit(jax.jacfwd(lambda x: layer(x[None])[0]))(x)  # [T, D, T, D]
    depends = np.abs(np.asarray(jac)).sum(axis=(1, 3)) > 0
    np.testing.assert_array_equal(depends, attention_mask(jnp.arange(10), jnp.arange(10), window))


def test_perturbing_a_token_leaves_earlier_outputs_unchanged():
    layer = _layer()
    x = jax.random.normal(jax.random.key(1), (2, 12, 16))
    f = jax.jit(lambda x: layer(x))
    y = f(x)
    y2 = f(x.at[:, 7].add(1.0))
    np.testing.assert_array_equal(y[:, :7], y2[:, :7])
    assert np.abs(np.asarray(y[:, 7:] - y2[:, 7:])).min(axis=-1).max() > 0


@pytest.mark.parametrize("window,max_len", [(0, 11), (4, 11), (4, None), (0, 20)])
def test_kv_cache_decode_equals_full_forward(window, max_len):
    layer = _layer(window)
    x = jax.random.normal(jax.random.key(2), (2, 11, 16))
    full = jax.jit(lambda x: layer(x))(x)
    cache = layer.init_cache(2, max_len)
    if window:
        assert cache.k.shape[1] == window  # ring buffer, constant memory
    step = jax.jit(lambda x, c: layer.decode(x, c))
    outs = []
    for i in range(11):
        y, cache = step(x[:, i : i + 1], cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
    assert int(cache.pos) == 11


def test_full_attention_cache_needs_max_len():
    with pytest.raises(ValueError, match="max_len"):
        _layer().init_cache(1)


def test_gqa_rejects_bad_head_counts():
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(16, 4, 3, 4, rngs=nnx.Rngs(0))


def test_param_logical_axes():
    layer = _layer()
    assert layer.q.kernel.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")
    assert layer.k.kernel.get_metadata()["out_sharding"] == ("embed", "kv_heads", "head_dim")
    assert layer.o.kernel.get_metadata()["out_sharding"] == ("heads", "head_dim", "embed")
    assert layer.k.kernel.shape == (16, 2, 8)


def test_bfloat16_compute_close_to_float32():
    x = jax.random.normal(jax.random.key(3), (2, 8, 16))
    l32, l16 = _layer(), _layer(dtype=jnp.bfloat16)
    y32 = jax.jit(lambda x: l32(x))(x)
    y16 = jax.jit(lambda x: l16(x))(x)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=5e-2)


@pytest.mark.parametrize("t,window,kvh", [(16, 4, 2), (13, 4, 4), (9, 2, 1), (5, 8, 2)])
def test_local_attention_equals_masked_attention(t, window, kvh):
    rng = np.random.default_rng(t * window)
    q = jnp.asarray(rng.normal(size=(2, t, 4, 8)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(2, t, kvh, 8)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=(2, t, kvh, 8)).astype(np.float32))
    pos = jnp.arange(t)
    want = dot_product_attention(q, k, v, attention_mask(pos, pos, window))
    np.testing.assert_allclose(
        jax.jit(local_attention, static_argnums=3)(q, k, v, window), want, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("t,kvh,documents", [(40, 2, False), (150, 4, True), (1100, 1, True)])
def test_causal_attention_by_blocks_equals_the_masked_einsum(t, kvh, documents):
    """One block (40 < 64), blocks of 64 with a ragged last one (150), and the block count capped at
    16 (1100: blocks of 69); outputs and gradients of q, k, v, with and without documents."""
    seed = fresh_seed()
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (2, t, 4, 8))
    k, v = (jax.random.normal(key, (2, t, kvh, 8)) for key in keys[1:3])
    segs = jnp.cumsum(jax.random.bernoulli(keys[3], 0.02, (2, t)), axis=1) if documents else None
    pos = jnp.arange(t)
    mask = attention_mask(pos, pos) if segs is None else attention_mask(pos, pos) & segment_mask(segs, segs)
    cot = jax.random.normal(jax.random.fold_in(keys[0], 1), q.shape)

    def grads(form):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(form(q, k, v) * cot), argnums=(0, 1, 2)))

    want = grads(lambda q, k, v: dot_product_attention(q, k, v, mask))(q, k, v)
    got = grads(lambda q, k, v: causal_attention(q, k, v, segs))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5 * float(jnp.abs(w).max()), err_msg=str(seed))
    out = causal_attention(q, k, v, segs)
    np.testing.assert_allclose(
        out, dot_product_attention(q, k, v, mask), rtol=1e-5, atol=1e-5, err_msg=str(seed)
    )
