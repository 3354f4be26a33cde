"""The two matrix helpers of the chunked form and their hand-written gradients.

`segment_products` and `unit_lower_inverse` carry custom VJPs (one or two matmuls instead of the
transpose of a scan or of a block recursion). Each is checked, in values and gradients, against
plain jax on the same inputs: explicit masked products (whose autodiff handles zero factors), and
`jnp.linalg.inv`. Fresh inputs every run, float32, relative error under 1e-5.
"""

import jax
import jax.numpy as jnp
import pytest

from nl_jax.memory.ops import closed_form
from tests.memory.inputs import fresh_seed, rel_err

TOL = 1e-5


def _explicit_segment_products(x):
    """P[i, s] = prod over s < r <= i of x_r, one masked product per entry."""
    c = x.shape[-1]
    i, s, r = (jnp.arange(c).reshape(shape) for shape in ((c, 1, 1), (1, c, 1), (1, 1, c)))
    factors = jnp.where((s < r) & (r <= i), x[..., None, None, :], 1.0)
    return jnp.where(i[..., 0] >= s[..., 0], jnp.prod(factors, axis=-1), 0.0)


@pytest.mark.parametrize("c", [1, 7, 16])
def test_segment_products_and_gradient_with_saturated_rates(c):
    seed = fresh_seed()
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.nn.sigmoid(jax.random.normal(k1, (3, 2, c)))
    if c > 4:  # gates that saturate to exactly 0 (forget all) and 1 (keep all)
        x = x.at[0, 0, 2].set(0.0).at[1, 1, 3].set(0.0).at[2, 0, 1].set(1.0)
    cot = jax.random.normal(k2, (3, 2, c, c))
    assert rel_err(closed_form.segment_products(x), _explicit_segment_products(x)) < TOL, seed
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * cot))(x)  # noqa: E731
    g, g_ref = grad(closed_form.segment_products), grad(_explicit_segment_products)
    assert rel_err(g, g_ref) < TOL, seed
    if c > 4:  # the factor of 0 still has its gradient: the product of the other factors
        assert float(jnp.abs(g[0, 0, 2])) > 0, seed


@pytest.mark.parametrize("n", [1, 13, 16])
def test_unit_lower_inverse_and_gradient(n):
    seed = fresh_seed()
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    # strictly lower entries of a unit lower-triangular matrix; the rest is ignored by the function
    t = 0.3 * jax.random.normal(k1, (2, 3, n, n)) + jnp.triu(jax.random.normal(k2, (2, 3, n, n)))
    cot = jax.random.normal(k3, (2, 3, n, n))
    plain = lambda t: jnp.linalg.inv(jnp.eye(n) + jnp.tril(t, -1))  # noqa: E731
    assert rel_err(closed_form.unit_lower_inverse(t), plain(t)) < TOL, seed
    grad = lambda f: jax.grad(lambda t: jnp.sum(f(t) * cot))(t)  # noqa: E731
    g, g_ref = grad(closed_form.unit_lower_inverse), grad(plain)
    assert float(jnp.abs(jnp.triu(g)).max()) == 0.0  # the diagonal and above are not read
    if n > 1:
        assert rel_err(g, g_ref) < TOL, seed
