"""Short causal conv (reference, causality, streaming), embeddings, SwiGLU, Linear."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nl_jax.layers import Embed, Linear, ShortConv, SwiGLU, Unembed


def _conv_numpy(x, w):
    b, t, c = x.shape
    width = w.shape[0]
    y = np.zeros_like(x)
    for i in range(t):
        for j in range(width):  # tap j looks back width-1-j tokens
            src = i - (width - 1 - j)
            if src >= 0:
                y[:, i] += x[:, src] * w[j]
    return y


@pytest.mark.parametrize("width,t", [(4, 9), (2, 5), (4, 3)])
def test_conv_matches_numpy(width, t):
    conv = ShortConv(6, width=width, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, t, 6)).astype(np.float32)
    np.testing.assert_allclose(
        conv(jnp.asarray(x)), _conv_numpy(x, np.asarray(conv.kernel[...])), rtol=1e-5, atol=1e-6
    )


def test_conv_is_causal():
    conv = ShortConv(6, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (1, 10, 6))
    f = jax.jit(lambda x: conv(x))
    y, y2 = f(x), f(x.at[:, 5].add(1.0))
    np.testing.assert_array_equal(y[:, :5], y2[:, :5])
    assert np.all(np.abs(np.asarray(y[:, 5:9] - y2[:, 5:9])) > 0)  # the next W-1 tokens see it
    np.testing.assert_array_equal(y[:, 9:], y2[:, 9:])  # and no further


def test_conv_decode_steps_and_chunks_equal_full():
    conv = ShortConv(6, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(1), (2, 11, 6))
    full = conv(x)
    state = conv.init_state(2)
    step = jax.jit(lambda x, s: conv.step(x, s))
    ys = []
    for i in range(11):
        y, state = step(x[:, i], state)
        ys.append(y)
    np.testing.assert_allclose(jnp.stack(ys, 1), full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state, x[:, -3:], rtol=0, atol=0)  # last W-1 inputs
    y1, s = conv.forward(x[:, :4])
    y2, _ = conv.forward(x[:, 4:], s)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), full, rtol=1e-6, atol=1e-6)


def test_embed_lookup_and_tied_unembedding():
    emb = Embed(10, 4, rngs=nnx.Rngs(0))
    table = np.asarray(emb.embedding[...])
    tokens = jnp.array([[1, 9, 0]])
    np.testing.assert_array_equal(emb(tokens), table[[[1, 9, 0]]])
    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    logits = emb.attend(x)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 3, 10)
    np.testing.assert_allclose(logits, np.asarray(x) @ table.T, rtol=1e-5, atol=1e-6)
    assert emb.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")
    un = Unembed(4, 10, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert un(x).dtype == jnp.float32
    assert un.kernel.get_metadata()["out_sharding"] == ("embed", "vocab")


def test_swiglu_matches_numpy():
    mlp = SwiGLU(8, 12, rngs=nnx.Rngs(0))
    x = np.random.default_rng(3).normal(size=(2, 5, 8)).astype(np.float32)
    g, u, d = (np.asarray(m.kernel[...]) for m in (mlp.gate, mlp.up, mlp.down))
    a = x @ g
    want = (a / (1 + np.exp(-a)) * (x @ u)) @ d
    np.testing.assert_allclose(mlp(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)
    assert mlp.down.kernel.get_metadata()["out_sharding"] == ("mlp", "embed")


def test_linear_multi_axis_contraction_and_shape_error():
    lin = Linear((3, 4), (5,), ("heads", "head_dim"), ("embed",), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    np.testing.assert_allclose(lin(x), jnp.einsum("bhd,hde->be", x, lin.kernel[...]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="trailing dims"):
        lin(jnp.ones((2, 4, 3)))


@pytest.mark.parametrize(
    "n,x_shape,out", [(1, (2, 5, 6), (7,)), (2, (3, 2, 4, 3), (2, 5)), (1, (4, 6), (3, 2))]
)
def test_rows_and_dot_general_forms_agree_with_their_gradients(n, x_shape, out):
    """Linear's CPU form (flattened rows) and the accelerators' (one dot_general): same products,
    same gradients of both operands, and the result dtype asked for."""
    from nl_jax.layers.linear import contract_trailing, trailing_as_rows, trailing_dot_general

    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, x_shape[len(x_shape) - n :] + out)
    lead = x_shape[: len(x_shape) - n]
    spec = (
        "abcd"[: len(lead)]
        + "pq"[:n]
        + ","
        + "pq"[:n]
        + "xy"[: len(out)]
        + "->"
        + "abcd"[: len(lead)]
        + "xy"[: len(out)]
    )
    want = jnp.einsum(spec, x, w)
    cot = jax.random.normal(kg, want.shape)
    for form in (trailing_as_rows, trailing_dot_general, contract_trailing):
        y, vjp = jax.vjp(lambda a, b, form=form: form(a, b, n=n), x, w)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5, err_msg=form.__name__)
        for got, ref in zip(vjp(cot), jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x, w)[1](cot)):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=form.__name__)
    low = contract_trailing(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), n, preferred_element_type=jnp.float32
    )
    assert low.dtype == jnp.float32 and low.shape == want.shape
