"""The chunked training form against the token-by-token reference, and the decode step against both.

Everything is float32 and must agree to a relative error under 1e-5: outputs, final states, and
gradients with respect to every input and to the initial state.
"""

import itertools

import jax
import jax.numpy as jnp
import pytest

from nl_jax.memory import ops
from tests.memory.inputs import fresh_seed, make_inputs, max_tree_rel_err, rel_err

TOL = 1e-5
RULES = {  # name -> (momentum, retention, dgd)
    "gd": (False, False, False),
    "gd_retention": (False, True, False),
    "titans_momentum": (True, True, False),
    "dgd": (False, True, True),
    "dgd_momentum": (True, True, True),
}
SHAPES = [  # (batch, length, heads, dim, hidden, chunk)
    (2, 16, 2, 8, 6, 4),
    (1, 24, 3, 4, 8, 8),
    (2, 12, 1, 6, 6, 3),
]


def _run(form, spec, state, q, k, v, rates, chunk, read):
    fn = {"naive": ops.memory_naive, "chunked": ops.memory_chunked}[form]
    return fn(spec, state, q, k, v, rates, chunk_size=chunk, read=read)


# Every structure x objective x rule once, the read modes spread over them (each mode >= 6 times).
CHUNK_ONE_CASES = [
    (structure, objective, rule, ops.READ_MODES[i % 3])
    for i, (structure, objective, rule) in enumerate(
        itertools.product(["linear", "mlp"], ["l2", "dot"], list(RULES))
    )
]


@pytest.mark.parametrize("structure,objective,rule,read", CHUNK_ONE_CASES)
def test_chunk_size_one_equals_naive(structure, objective, rule, read):
    seed = fresh_seed()
    spec = ops.MemorySpec(structure, objective)
    mom, ret, dgd = RULES[rule]
    state, q, k, v, rates = make_inputs(seed, spec, momentum=mom, retention=ret, dgd=dgd)
    y_ref, s_ref = _run("naive", spec, state, q, k, v, rates, 1, read)
    y, s = _run("chunked", spec, state, q, k, v, rates, 1, read)
    assert rel_err(y, y_ref) < TOL, seed
    assert max_tree_rel_err(s.weights, s_ref.weights) < TOL, seed
    if mom:
        assert max_tree_rel_err(s.momentum, s_ref.momentum) < TOL, seed


def _loss_fn(form, spec, chunk, read, cot_y, cot_w):
    """A scalar that touches the outputs and the final weights, with fixed random cotangents."""

    def loss(weights, momentum, q, k, v, rates):
        state = ops.init_state(weights, momentum=False)._replace(momentum=momentum)
        y, s = _run(form, spec, state, q, k, v, rates, chunk, read)
        out = jnp.sum(y * cot_y)
        for w, c in zip(jax.tree.leaves(s.weights), jax.tree.leaves(cot_w)):
            out = out + jnp.sum(w * c)
        return out

    return loss


# Each structure meets each rule, each read mode and each shape (a covering set, not the full product).
GRAD_CASES = [
    ("linear", "l2", "gd_retention", "boundary", SHAPES[0]),
    ("linear", "l2", "titans_momentum", "post_update", SHAPES[1]),
    ("linear", "l2", "dgd_momentum", "per_token", SHAPES[2]),
    ("linear", "dot", "dgd", "post_update", SHAPES[0]),
    ("mlp", "l2", "gd_retention", "per_token", SHAPES[1]),
    ("mlp", "l2", "titans_momentum", "boundary", SHAPES[2]),
    ("mlp", "l2", "dgd_momentum", "post_update", SHAPES[0]),
    ("mlp", "l2", "dgd_momentum", "per_token", SHAPES[1]),
    ("mlp", "dot", "dgd_momentum", "per_token", SHAPES[2]),
    ("mlp", "l2", "dgd", "boundary", SHAPES[0]),
]


@pytest.mark.parametrize("structure,objective,rule,read,shape", GRAD_CASES)
def test_chunked_equals_naive_with_gradients(structure, objective, rule, read, shape):
    seed = fresh_seed()
    batch, length, heads, dim, hidden, chunk = shape
    spec = ops.MemorySpec(structure, objective)
    mom, ret, dgd = RULES[rule]
    state, q, k, v, rates = make_inputs(
        seed,
        spec,
        batch=batch,
        length=length,
        heads=heads,
        dim=dim,
        hidden=hidden,
        momentum=mom,
        retention=ret,
        dgd=dgd,
    )
    y_ref, s_ref = _run("naive", spec, state, q, k, v, rates, chunk, read)
    y, s = _run("chunked", spec, state, q, k, v, rates, chunk, read)
    assert rel_err(y, y_ref) < TOL, seed
    assert max_tree_rel_err(s.weights, s_ref.weights) < TOL, seed
    assert max_tree_rel_err(s.boundary, s_ref.boundary) < TOL, seed
    assert int(s.step) == int(s_ref.step) == 0

    key = jax.random.key(seed + 1)
    cot_y = jax.random.normal(key, y.shape)
    cot_w = jax.tree.map(lambda w: jax.random.normal(jax.random.fold_in(key, w.size), w.shape), s.weights)
    args = (state.weights, state.momentum, q, k, v, rates)
    argnums = tuple(range(6)) if mom else (0, 2, 3, 4, 5)
    g_ref = jax.grad(_loss_fn("naive", spec, chunk, read, cot_y, cot_w), argnums)(*args)
    g = jax.grad(_loss_fn("chunked", spec, chunk, read, cot_y, cot_w), argnums)(*args)
    names = ["weights", "momentum", "q", "k", "v", "rates"]
    for i, a, b in zip(argnums, g, g_ref):
        assert max_tree_rel_err(a, b) < TOL, (names[i], seed)
    # the gradient reaches the initial state (meta-learned initial memories depend on it)
    assert float(jnp.abs(jax.tree.leaves(g[0])[0]).max()) > 0


@pytest.mark.parametrize(
    "structure,read", [("linear", "per_token"), ("mlp", "boundary"), ("mlp", "post_update")]
)
def test_streaming_equals_one_call(structure, read):
    seed = fresh_seed()
    spec = ops.MemorySpec(structure, "l2")
    chunk = 4
    state, q, k, v, rates = make_inputs(seed, spec, length=24)
    y_full, s_full = ops.memory_chunked(spec, state, q, k, v, rates, chunk_size=chunk, read=read)
    cut = lambda x, a, b: jax.tree.map(lambda t: t[:, a:b], x)  # noqa: E731
    # chunked: split on a chunk boundary
    y1, s1 = ops.memory_chunked(spec, state, *cut((q, k, v, rates), 0, 8), chunk_size=chunk, read=read)
    y2, s2 = ops.memory_chunked(spec, s1, *cut((q, k, v, rates), 8, 24), chunk_size=chunk, read=read)
    assert rel_err(jnp.concatenate([y1, y2], 1), y_full) < TOL, seed
    assert max_tree_rel_err(s2.weights, s_full.weights) < TOL, seed
    # naive: any split point, including inside a chunk (the state carries boundary and position)
    n1, t1 = ops.memory_naive(spec, state, *cut((q, k, v, rates), 0, 10), chunk_size=chunk, read=read)
    assert int(t1.step) == 2
    n2, t2 = ops.memory_naive(spec, t1, *cut((q, k, v, rates), 10, 24), chunk_size=chunk, read=read)
    assert rel_err(jnp.concatenate([n1, n2], 1), y_full) < TOL, seed
    assert max_tree_rel_err(t2.weights, s_full.weights) < TOL, seed


@pytest.mark.parametrize("structure", ["linear", "mlp"])
@pytest.mark.parametrize("read", ops.READ_MODES)
def test_causality(structure, read):
    seed = fresh_seed()
    spec = ops.MemorySpec(structure, "l2")
    chunk, t = 4, 9  # t sits inside the third chunk, tokens 8..11
    state, q, k, v, rates = make_inputs(seed, spec, length=16)
    run = lambda *x: ops.memory_chunked(spec, state, *x, chunk_size=chunk, read=read)[0]  # noqa: E731
    y = run(q, k, v, rates)
    bump = lambda x: x.at[:, t].add(1.0)  # noqa: E731
    y_all = run(bump(q), bump(k), bump(v), rates._replace(lr=bump(rates.lr)))
    assert float(jnp.abs(y_all[:, :t] - y[:, :t]).max()) == 0.0, seed
    assert float(jnp.abs(y_all[:, t:] - y[:, t:]).max()) > 1e-4, seed
    # A write (key, value, rate) at t reaches: the next chunk (boundary), t+1 on (per_token), t on (post_update).
    y_write = run(q, bump(k), bump(v), rates._replace(lr=bump(rates.lr)))
    first = {"boundary": 12, "per_token": t + 1, "post_update": t}[read]
    assert float(jnp.abs(y_write[:, :first] - y[:, :first]).max()) == 0.0, seed
    assert float(jnp.abs(y_write[:, first:] - y[:, first:]).max()) > 1e-4, seed


@pytest.mark.parametrize(
    "structure,objective,read,chunk",
    [
        ("linear", "l2", "per_token", 1),
        ("linear", "dot", "post_update", 4),
        ("linear", "l2", "boundary", 4),
        ("mlp", "l2", "boundary", 1),
        ("mlp", "l2", "per_token", 4),
        ("mlp", "dot", "post_update", 1),
        ("mlp", "l2", "post_update", 4),
        ("mlp", "dot", "boundary", 4),
    ],
)
def test_recurrent_steps_equal_naive(structure, objective, read, chunk):
    seed = fresh_seed()
    spec = ops.MemorySpec(structure, objective)
    state, q, k, v, rates = make_inputs(seed, spec, length=12)
    y_ref, s_ref = ops.memory_naive(spec, state, q, k, v, rates, chunk_size=chunk, read=read)
    step = jax.jit(lambda s, *x: ops.memory_recurrent(spec, s, *x, chunk_size=chunk, read=read))
    ys, s = [], state
    for i in range(q.shape[1]):
        y, s = step(s, *jax.tree.map(lambda x: x[:, i], (q, k, v, rates)))
        ys.append(y)
    assert rel_err(jnp.stack(ys, 1), y_ref) < TOL, seed
    assert max_tree_rel_err(s, s_ref) < TOL, seed


def test_closed_form_gradient_factors_match_autodiff():
    seed = fresh_seed()
    for structure, objective in itertools.product(["linear", "mlp"], ["l2", "dot"]):
        spec = ops.MemorySpec(structure, objective, "silu")
        state, q, k, v, _ = make_inputs(seed, spec, batch=1, heads=1, length=5)
        w = jax.tree.map(lambda x: x[0, 0], state.weights)
        fac = ops.structures.token_errors(spec, w, k[0, :, 0], v[0, :, 0])
        for t in range(5):
            g = jax.grad(ops.structures.token_loss, argnums=1)(spec, w, k[0, t, 0], v[0, t, 0])
            closed = jax.tree.map(lambda e, x: jnp.outer(e[t], x[t]), fac.errors, fac.inputs)
            assert max_tree_rel_err(closed, g) < TOL, (structure, objective, seed)


@pytest.mark.parametrize("structure", ["linear", "mlp"])
def test_rates_of_exactly_zero_and_one(structure):
    """Saturated gates: retention 0 (forget all), momentum decay 0 and 1, in values and gradients."""
    seed = fresh_seed()
    spec = ops.MemorySpec(structure, "l2")
    state, q, k, v, rates = make_inputs(seed, spec, length=16)
    rates = rates._replace(
        retention=rates.retention.at[:, 5].set(0.0).at[:, 9].set(1.0),
        momentum=rates.momentum.at[:, 6].set(0.0).at[:, 10].set(1.0),
    )
    grad = lambda form: jax.grad(  # noqa: E731
        lambda r: jnp.sum(_run(form, spec, state, q, k, v, r, 8, "per_token")[0] ** 2)
    )(rates)
    y_ref, _ = _run("naive", spec, state, q, k, v, rates, 8, "per_token")
    y, _ = _run("chunked", spec, state, q, k, v, rates, 8, "per_token")
    assert rel_err(y, y_ref) < TOL, seed
    assert max_tree_rel_err(grad("chunked"), grad("naive")) < TOL, seed


def test_state_keeps_its_dtype():
    spec = ops.MemorySpec("mlp", "l2")
    state, q, k, v, rates = make_inputs(0, spec, length=8)
    state = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, state)
    for fn in (ops.memory_chunked, ops.memory_naive):
        _, s = fn(spec, state, q, k, v, rates, chunk_size=4)
        assert {x.dtype for x in jax.tree.leaves((s.weights, s.momentum))} == {jnp.dtype(jnp.bfloat16)}
    _, s = ops.memory_recurrent(spec, state, *jax.tree.map(lambda x: x[:, 0], (q, k, v, rates)), chunk_size=4)
    assert {x.dtype for x in jax.tree.leaves((s.weights, s.momentum, s.boundary))} == {
        jnp.dtype(jnp.bfloat16)
    }


def test_bad_inputs_are_named():
    spec = ops.MemorySpec("linear", "l2")
    state, q, k, v, rates = make_inputs(0, spec, length=10)
    with pytest.raises(ValueError, match="chunk_size 4 does not divide the sequence length 10"):
        ops.memory_chunked(spec, state, q, k, v, rates, chunk_size=4)
    with pytest.raises(ValueError, match="read must be one of"):
        ops.memory_naive(spec, state, q, k, v, rates, read="sideways")
    with pytest.raises(ValueError, match="momentum"):
        ops.memory_chunked(spec, state, q, k, v, rates._replace(momentum=None), chunk_size=5)
    with pytest.raises(ValueError, match="memory structure"):
        ops.MemorySpec("conv", "l2")
    _, mid = ops.memory_naive(
        spec, state, q[:, :3], k[:, :3], v[:, :3], jax.tree.map(lambda r: r[:, :3], rates), chunk_size=5
    )
    with pytest.raises(ValueError, match="3 tokens into a chunk"):
        ops.memory_chunked(spec, mid, q, k, v, rates, chunk_size=5)
    with pytest.raises(TypeError, match="MLPWeights"):
        ops.memory_chunked(ops.MemorySpec("mlp"), state, q, k, v, rates, chunk_size=5)
