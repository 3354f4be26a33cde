"""Per-token inner gradient clipping (`MemorySpec.max_grad_norm`): the chunked and recurrent forms
(which clip the rank-one factors) equal the token-by-token reference (which clips `jax.grad`'s
gradients), outputs, states and gradients; and the clip is active where it says."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from nl_jax.memory import ops
from tests.memory.inputs import fresh_seed, make_inputs, max_tree_rel_err, rel_err

TOL = 1e-5


@pytest.mark.parametrize("structure,read", [("linear", "per_token"), ("mlp", "boundary")])
def test_clipped_chunked_and_recurrent_equal_naive(structure, read):
    seed = fresh_seed()
    spec = ops.MemorySpec(structure, "l2", "silu", max_grad_norm=0.1)
    state, q, k, v, rates = make_inputs(seed, spec, length=8, dim=6, hidden=5)
    v = 4.0 * v  # errors far above the bound: tokens are clipped, far from its kink

    def run(form, weights, q, k, v, rates, chunk):
        fn = {"naive": ops.memory_naive, "chunked": ops.memory_chunked}[form]
        return fn(
            spec,
            state._replace(weights=weights, boundary=weights),
            q,
            k,
            v,
            rates,
            chunk_size=chunk,
            read=read,
        )

    for chunk in (1, 4):
        y_ref, s_ref = run("naive", state.weights, q, k, v, rates, chunk)
        y, s = run("chunked", state.weights, q, k, v, rates, chunk)
        assert rel_err(y, y_ref) < TOL and max_tree_rel_err(s, s_ref) < TOL, (seed, chunk)
    loss = lambda form: lambda *a: jnp.sum(jnp.sin(run(form, *a, 4)[0]))  # noqa: E731
    args = (state.weights, q, k, v, rates)
    g_ref, g = (jax.grad(loss(f), argnums=tuple(range(5)))(*args) for f in ("naive", "chunked"))
    assert max_tree_rel_err(g, g_ref) < TOL, seed

    step = jax.jit(lambda s, *x: ops.memory_recurrent(spec, s, *x, chunk_size=4, read=read))
    s, ys = state, []
    for i in range(q.shape[1]):
        y_t, s = step(s, *jax.tree.map(lambda x: x[:, i], (q, k, v, rates)))
        ys.append(y_t)
    y_ref, s_ref = ops.memory_naive(spec, state, q, k, v, rates, chunk_size=4, read=read)
    assert rel_err(jnp.stack(ys, 1), y_ref) < TOL and max_tree_rel_err(s, s_ref) < TOL, seed

    # Active: the clipped run differs from the unclipped one, and a huge bound changes nothing.
    plain = dataclasses.replace(spec, max_grad_norm=0.0)
    y_plain, _ = ops.memory_naive(plain, state, q, k, v, rates, chunk_size=4, read=read)
    loose = dataclasses.replace(spec, max_grad_norm=1e6)
    y_loose, _ = ops.memory_naive(loose, state, q, k, v, rates, chunk_size=4, read=read)
    assert rel_err(y_ref, y_plain) > 1e-3 and rel_err(y_loose, y_plain) < 1e-6, seed


def test_clipped_token_gradient_has_the_bound_as_norm():
    spec = ops.MemorySpec("mlp", "l2", "silu", max_grad_norm=0.25)
    state, _, k, v, _ = make_inputs(0, spec, batch=1, length=1, heads=1, dim=6, hidden=5)
    w = jax.tree.map(lambda a: a[0, 0], state.weights)
    g = ops.structures.clip_grads(
        spec, jax.grad(ops.structures.token_loss, 1)(spec, w, k[0, 0, 0], 9 * v[0, 0, 0])
    )
    assert abs(float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))) - 0.25) < 1e-6
    with pytest.raises(ValueError, match="max_grad_norm must be >= 0"):
        ops.MemorySpec("mlp", max_grad_norm=-1.0)
