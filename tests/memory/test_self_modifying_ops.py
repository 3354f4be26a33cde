"""The ops generalised for self-modifying Titans: self-generated targets (v_hat = M_B(v)) and the
streaming form (`memory_stream`: any length from any position in a chunk), each against the
token-by-token reference `memory_naive` on outputs, final state and gradients."""

import jax
import jax.numpy as jnp
import pytest

from nl_jax.memory import ops
from tests.memory.inputs import fresh_seed, make_inputs, max_tree_rel_err, rel_err

TOL = 1e-5


def _cut(xs, a, b):
    return jax.tree.map(lambda t: t[:, a:b], xs)


def _streamed(spec, state, xs, splits, chunk, read):
    """Run xs through memory_stream in pieces of the given lengths; outputs concatenated."""
    ys, s, a = [], state, 0
    for n in splits:
        y, s = ops.memory_stream(spec, s, *_cut(xs, a, a + n), chunk_size=chunk, read=read)
        ys.append(y)
        a += n
    return jnp.concatenate(ys, 1), s


@pytest.mark.parametrize(
    "structure,read,self_target,splits,chunk",
    [
        ("mlp", "per_token", True, (5, 16, 11), 8),  # starts, crosses and ends mid-chunk
        pytest.param("linear", "post_update", True, (13, 19), 16, marks=pytest.mark.slow),
    ],
)
def test_stream_any_split_equals_naive_with_gradients(structure, read, self_target, splits, chunk):
    seed = fresh_seed()
    spec = ops.MemorySpec(structure, "l2", "silu", self_target=self_target)
    state, q, k, v, rates = make_inputs(seed, spec, length=sum(splits), hidden=8)
    xs = (q, k, v, rates)
    y_ref, s_ref = ops.memory_naive(spec, state, *xs, chunk_size=chunk, read=read)
    y, s = _streamed(spec, state, xs, splits, chunk, read)
    assert rel_err(y, y_ref) < TOL, seed
    assert max_tree_rel_err(s, s_ref) < TOL, seed
    assert int(s.step) == sum(splits) % chunk

    cot = jax.random.normal(jax.random.key(seed + 1), y.shape)

    def loss(form):
        def f(weights, xs):
            st = state._replace(weights=weights, boundary=weights)
            if form == "naive":
                out, fin = ops.memory_naive(spec, st, *xs, chunk_size=chunk, read=read)
            else:
                out, fin = _streamed(spec, st, xs, splits, chunk, read)
            return jnp.sum(out * cot) + sum(jnp.sum(w) for w in jax.tree.leaves(fin.weights))

        return f

    g_ref = jax.grad(loss("naive"), argnums=(0, 1))(state.weights, xs)
    g = jax.grad(loss("stream"), argnums=(0, 1))(state.weights, xs)
    assert max_tree_rel_err(g, g_ref) < TOL, seed


@pytest.mark.parametrize("read", ["per_token", "boundary"])
def test_stream_within_chunk_equals_naive(read):
    """Pieces that divide the chunk, run `within_chunk` (one pass, no crossing branch): the
    token-by-token reference's outputs and states; a piece that would cross is refused."""
    seed = fresh_seed()
    spec = ops.MemorySpec("mlp", "l2", "silu", self_target=True)
    state, q, k, v, rates = make_inputs(seed, spec, length=16, hidden=8)
    xs = (q, k, v, rates)
    y_ref, s_ref = ops.memory_naive(spec, state, *xs, chunk_size=8, read=read)
    ys, s = [], state
    for a in range(0, 16, 4):
        y, s = ops.memory_stream(spec, s, *_cut(xs, a, a + 4), chunk_size=8, read=read, within_chunk=True)
        ys.append(y)
    assert rel_err(jnp.concatenate(ys, 1), y_ref) < TOL, seed
    assert max_tree_rel_err(s, s_ref) < TOL, seed
    with pytest.raises(ValueError, match="must fit in one chunk of 8"):
        ops.memory_stream(spec, state, *_cut(xs, 0, 12), chunk_size=8, read=read, within_chunk=True)


@pytest.mark.parametrize("structure,read", [("mlp", "per_token"), ("linear", "boundary")])
def test_self_target_chunked_equals_naive(structure, read):
    seed = fresh_seed()
    spec = ops.MemorySpec(structure, "l2", "silu", self_target=True)
    state, q, k, v, rates = make_inputs(seed, spec, length=16, hidden=8)
    y_ref, s_ref = ops.memory_naive(spec, state, q, k, v, rates, chunk_size=4, read=read)
    y, s = ops.memory_chunked(spec, state, q, k, v, rates, chunk_size=4, read=read)
    assert rel_err(y, y_ref) < TOL, seed
    assert max_tree_rel_err(s, s_ref) < TOL, seed
    # the target really is self-generated: it differs from training on v itself
    y_plain, _ = ops.memory_chunked(
        ops.MemorySpec(structure, "l2", "silu"), state, q, k, v, rates, chunk_size=4
    )
    assert rel_err(y_plain, y) > 1e-3, seed


def test_stream_decode_steps_equal_naive():
    """One token per call (the decode step) through the streaming form, chunk 4."""
    seed = fresh_seed()
    spec = ops.MemorySpec("mlp", "l2", "silu", self_target=True)
    state, q, k, v, rates = make_inputs(seed, spec, length=10, hidden=8)
    y_ref, s_ref = ops.memory_naive(spec, state, q, k, v, rates, chunk_size=4, read="per_token")
    y, s = _streamed(spec, state, (q, k, v, rates), (1,) * 10, 4, "per_token")
    assert rel_err(y, y_ref) < TOL, seed
    assert max_tree_rel_err(s, s_ref) < TOL, seed
