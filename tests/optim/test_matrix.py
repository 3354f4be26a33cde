"""Which axes form the matrix: reshapes, per-parameter specs, and N-D / stacked weights."""

import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.optim import MatrixDims, orthogonalize
from nl_jax.optim import matrix


@pytest.mark.parametrize(
    "shape,dims,flat",
    [
        ((6, 8), MatrixDims(), (1, 6, 8)),
        ((3, 6, 8), MatrixDims(), (3, 6, 8)),  # scanned layers: leading axis is batch
        ((3, 3, 4, 5), MatrixDims((0, 1, 2), 3), (1, 36, 5)),  # conv kernel
        ((4, 2, 6, 8), MatrixDims(2, (0, 3)), (2, 6, 32)),  # batch axis in the middle
        ((7,), None, (1, 7, 1)),  # vector fallback: one column
    ],
)
def test_matrix_view_round_trip(shape, dims, flat):
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    view = matrix.matrix_view(shape, dims)
    m = view.to_matrix(x)
    assert m.shape == flat
    np.testing.assert_array_equal(view.from_matrix(m), x)


def test_matrix_view_puts_reduction_rows_and_output_columns():
    x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(3, 2, 4)  # (in, batch, out)
    m = matrix.matrix_view(x.shape, MatrixDims(0, 2)).to_matrix(x)
    np.testing.assert_array_equal(m[1], x[:, 1, :])


def test_leaf_dims_default_callable_and_pytree():
    params = {"w": jnp.zeros((4, 5)), "stack": jnp.zeros((2, 4, 5)), "b": jnp.zeros((5,))}
    # leaves are in key order: b, stack, w
    assert matrix.leaf_dims(None, params) == [None, MatrixDims(), MatrixDims()]
    tree = {"w": MatrixDims(1, 0), "stack": None, "b": None}
    assert matrix.leaf_dims(tree, params) == [None, None, MatrixDims(1, 0)]
    assert matrix.leaf_dims(lambda p: tree, params) == [None, None, MatrixDims(1, 0)]
    with pytest.raises(ValueError, match="rank < 2"):
        matrix.leaf_dims({"w": None, "stack": None, "b": MatrixDims()}, params)
    with pytest.raises(ValueError, match="disjoint"):
        matrix.normalize_axes(2, MatrixDims(0, 0))


def test_orthogonalize_stacked_equals_per_layer_and_transposed_dims():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 6, 4)), jnp.float32)
    stacked = orthogonalize(x, MatrixDims())
    for i in range(3):
        np.testing.assert_allclose(stacked[i], orthogonalize(x[i], MatrixDims()), rtol=1e-5, atol=1e-6)
    # Swapping reduction and output axes is the same matrix transposed (NS commutes with ^T).
    np.testing.assert_allclose(orthogonalize(x[0], MatrixDims(1, 0)), stacked[0], rtol=1e-5, atol=1e-6)
