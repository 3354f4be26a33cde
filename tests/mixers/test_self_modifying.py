"""The self-modifying Titans layer against its token-by-token reference (outputs, final state,
gradients wrt every parameter and the input), streaming at any split and decoding, causality, one
test per flag, the linear case as a gated delta rule in numpy, bad input and the FLOPs helper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nl_jax.mixers import self_modifying_cost
from nl_jax.mixers.self_modifying import SelfModifyingTitans
from nl_jax.mixers.self_modifying_reference import reference_forward
from tests.memory.inputs import fresh_seed, max_grad_err, max_tree_rel_err, rel_err

TOL = 1e-5
D = 16
# Inner learning rates up to 0.35 (configs use 0.1): at 0.7 the unclipped inner recurrence of some
# draws expands (v memory 1 -> 350 in 16 tokens) and carries float32 rounding up to 1.4e-4 of the
# final state (1 draw in 300); at 0.35 the largest of 300 draws per case was 1e-6.
MAX_LR = 0.35


def _layer(seed, heads=2, head_dim=4, scale=0.05, **kw):
    """A layer whose Params are all moved off their init (so every path and gradient is exercised).
    Inner gradient clipping is off: its kink at the bound would make gradient comparisons flaky for a
    token whose norm sits on it (tests/memory/test_ops_grad_clip.py covers the clipped forms).
    Unclipped, a layer moved by `scale=0.1` diverges on about 1 draw in 250 (the v memory's
    self-generated target M_v(v) feeds its own update: 6 -> 1e25 in three tokens, then NaN on both
    sides of a comparison); at 0.05, none of 20,000 draws over this file's shapes did."""
    kw.setdefault("max_lr", MAX_LR)
    kw.setdefault("max_grad_norm", 0.0)
    layer = SelfModifyingTitans(D, heads, head_dim, rngs=nnx.Rngs(seed), **kw)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
    leaves = [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)


def _x(seed, length, batch=2):
    return jax.random.normal(jax.random.key(seed + 3), (batch, length, D))


@nnx.jit
def _call(layer, x, state=None):
    return layer(x, state)


def _value_and_grads(fn, layer, x, cot):
    """Output, final state, and gradients of <output, cot> wrt every Param and the input."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
        y, state = fn(nnx.merge(graphdef, params, rest), x)
        return jnp.sum(y * cot), (y, state)

    (_, (y, state)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, state, grads


SLOW = pytest.mark.slow
CASES = [  # constructor kwargs, heads, head_dim, length
    (dict(chunk_size=1, memory_chunk_size=1, read="boundary"), 2, 4, 12),
    (dict(chunk_size=1, memory_chunk_size=1, read="per_token", structure="linear", adaptive_q=True), 1, 8, 8),
    (dict(chunk_size=4, memory_chunk_size=8, read="per_token", hidden=6), 2, 4, 16),
    # More shapes and flag mixes: the extended run (pytest -m slow).
    pytest.param(
        dict(chunk_size=2, memory_chunk_size=8, read="boundary", dgd=False, momentum=False),
        3,
        4,
        16,
        marks=SLOW,
    ),
    pytest.param(
        dict(chunk_size=4, memory_chunk_size=4, read="per_token", weight_decay=False, adaptive_q=True),
        2,
        3,
        8,
        marks=SLOW,
    ),
]


@pytest.mark.parametrize("kw,heads,head_dim,length", CASES)
def test_chunked_equals_token_by_token_reference(kw, heads, head_dim, length):
    seed = fresh_seed()
    layer = _layer(seed, heads, head_dim, **kw)
    x = _x(seed, length)
    cot = jax.random.normal(jax.random.key(seed + 5), x.shape)
    y, _, g = _value_and_grads(lambda m, x: m(x), layer, x, cot)
    y_ref, state_ref, g_ref = _value_and_grads(reference_forward, layer, x, cot)
    assert rel_err(y, y_ref) < TOL, seed
    assert max_grad_err(g, g_ref) < TOL and max_tree_rel_err(g, g_ref) < 1e-3, seed
    flat = dict(nnx.to_flat_state(g[0]))
    assert any("init_w" in str(p) for p in flat)  # the meta-learned initial memories get gradients
    for path, leaf in flat.items():
        assert float(jnp.abs(leaf[...]).max()) > 0, f"no gradient reaches {path} (seed {seed})"
    # the final state of one streaming call over the whole sequence
    _, state = _call(layer, x, layer.init_state(x.shape[0]))
    assert max_tree_rel_err(state, state_ref) < TOL, seed


def test_streaming_any_split_and_decoding_equal_one_call():
    seed = fresh_seed()
    layer = _layer(seed, chunk_size=8, memory_chunk_size=16, read="per_token")
    x = _x(seed, 32)
    y_full, _ = _call(layer, x)
    state, ys, a = layer.init_state(2), [], 0
    for n in (5, 16, 11):  # starts, crosses and ends inside chunks of both sizes
        y, state = _call(layer, x[:, a : a + n], state)
        ys.append(y)
        a += n
    # Streaming sums the float32 updates in a different block order, and the outputs read those
    # states: seeds 197347986 (a state leaf) and 593865972 (the outputs) reached 1.4e-5 (a wrong
    # split or a lost token costs 1e-2 and more).
    assert rel_err(jnp.concatenate(ys, 1), y_full) < 5 * TOL, seed
    _, state_one = _call(layer, x, layer.init_state(2))
    assert max_tree_rel_err(state, state_one) < 5 * TOL, seed
    assert int(state.memory.step) == 0 and int(state.memories.step) == 0

    small = _layer(seed, chunk_size=2, memory_chunk_size=4, read="boundary")
    x = _x(seed, 8)
    y_full, _ = _call(small, x)
    state, ys = small.init_state(2), []
    for t in range(8):  # decode: the one-token case of the same path
        y, state = _call(small, x[:, t : t + 1], state)
        ys.append(y)
    assert rel_err(jnp.concatenate(ys, 1), y_full) < 5 * TOL, seed


def test_streaming_gradients_equal_training_gradients():
    """Segments that start and end inside chunks (dynamic positions, both passes of a block) give
    the gradients of the one-call training forward, meta-learned initial memories included."""
    seed = fresh_seed()
    layer = _layer(seed, chunk_size=2, memory_chunk_size=4, read="per_token")
    x = _x(seed, 8)
    cot = jax.random.normal(jax.random.key(seed + 5), x.shape)

    def segments(model, x):
        state, ys = model.init_state(x.shape[0]), []
        for a, b in ((0, 3), (3, 8)):
            y, state = model(x[:, a:b], state)
            ys.append(y)
        return jnp.concatenate(ys, 1), state

    y, _, g = _value_and_grads(lambda m, x: m(x), layer, x, cot)
    y_seg, _, g_seg = _value_and_grads(segments, layer, x, cot)
    assert rel_err(y_seg, y) < TOL, seed
    assert max_grad_err(g_seg, g) < TOL and max_tree_rel_err(g_seg, g) < 1e-3, seed


@pytest.mark.parametrize("read", ["boundary", "per_token"])
def test_aligned_segments_inside_an_output_chunk_equal_the_streaming_form(read):
    """Segments that divide the output memory's chunk (a sized HOPE config's ntp segments), run
    `aligned`: the small memories chunked from the carried state, the output memory one streaming
    pass with no crossing branch. Outputs, states and gradients are those of the streaming form and
    of the one-call training forward, at every position of a segment in the chunk."""
    seed = fresh_seed()
    layer = _layer(seed, chunk_size=2, memory_chunk_size=8, read=read)
    assert layer.aligned(4) and layer.aligned(8) and not layer.aligned(6)
    x = _x(seed, 16)
    cot = jax.random.normal(jax.random.key(seed + 5), x.shape)

    def segments(aligned):
        def run(model, x):
            state, ys = model.init_state(x.shape[0]), []
            for a in range(0, 16, 4):  # positions 0, 4 in each chunk of 8
                y, state = model(x[:, a : a + 4], state, aligned=aligned)
                ys.append(y)
            return jnp.concatenate(ys, 1), state

        return run

    y, _, g = _value_and_grads(lambda m, x: m(x), layer, x, cot)
    y_al, state_al, g_al = _value_and_grads(segments(True), layer, x, cot)
    y_st, state_st, g_st = _value_and_grads(segments(False), layer, x, cot)
    assert rel_err(y_al, y_st) < TOL and rel_err(y_al, y) < TOL, seed
    assert max_tree_rel_err(state_al, state_st) < TOL, seed
    assert max_grad_err(g_al, g_st) < TOL and max_grad_err(g_al, g) < TOL, seed
    assert max_tree_rel_err(g_al, g) < 1e-3, seed


def test_bfloat16_compute_keeps_float32_fast_weights():
    layer = _layer(0, chunk_size=2, memory_chunk_size=4, dtype="bfloat16")
    x = _x(0, 8).astype(jnp.bfloat16)
    y, state = _call(layer, x, layer.init_state(2))
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    fast = [state.memory.weights, state.memories.weights]
    assert {w.dtype for w in jax.tree.leaves(fast)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("read", ["boundary", "per_token"])
def test_causality(read):
    seed = fresh_seed()
    layer = _layer(seed, chunk_size=2, memory_chunk_size=8, read=read)
    x = _x(seed, 16, batch=1)
    t = 9
    y, _ = _call(layer, x)
    y2, _ = _call(layer, x.at[:, t].add(1.0))
    assert float(jnp.abs(y2[:, :t] - y[:, :t]).max()) == 0.0, seed
    assert float(jnp.abs(y2[:, t:] - y[:, t:]).max()) > 1e-5, seed


# ----------------------------------------------------------------------------------------- flags


def _params(layer):
    return {tuple(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}


def _like(src, **kw):
    """A layer with flags `kw` that shares every Param of `src` it has (same names)."""
    kw = dict(max_lr=MAX_LR, max_grad_norm=0.0, chunk_size=2, memory_chunk_size=8, **kw)
    dst = SelfModifyingTitans(D, 2, 4, rngs=nnx.Rngs(0), **kw)
    src_params = _params(src)
    state = nnx.state(dst, nnx.Param)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        if tuple(map(str, path)) in src_params:
            var[...] = src_params[tuple(map(str, path))][...]
    nnx.update(dst, nnx.from_flat_state(flat))
    return dst


FLAGS = [  # flag, Params that appear (+) or vanish (-), state memory that appears or vanishes
    (dict(dgd=False), set(), None),
    (dict(momentum=False), {"-beta_proj"}, None),
    (dict(weight_decay=False), {"-alpha_readout", "-alpha_bias", "-memory_alpha"}, "-alpha"),
    (dict(adaptive_k=False), {"-memory_k"}, "-k"),
    (dict(adaptive_v=False), {"-memory_v"}, "-v"),
    (dict(adaptive_q=True), {"+memory_q"}, "+q"),
    (
        dict(memory_inputs="projected"),
        {f"+{n}_proj" for n in ("q", "k", "v", "eta", "alpha")} | {"+q_conv", "+k_conv", "+v_conv", "-in_proj", "-in_conv"},
        None,
    ),
]


@pytest.mark.parametrize("flag,params,memory", FLAGS)
def test_each_flag_changes_exactly_its_part(flag, params, memory):
    seed = fresh_seed()
    base = _layer(seed, chunk_size=2, memory_chunk_size=8)
    other = _like(base, **flag) if "adaptive_q" not in flag else None
    if other is None:  # adaptive_q adds Params: start from that layer and share the rest
        other = _layer(seed, chunk_size=2, memory_chunk_size=8, **flag)
        base = _like(other)
    top = lambda layer: {p[0] for p in _params(layer)}  # noqa: E731
    diff = {"+" + n for n in top(other) - top(base)} | {"-" + n for n in top(base) - top(other)}
    assert diff == params
    names = lambda layer: set(layer.small_states(layer.init_state(1).memories))  # noqa: E731
    mems_base, mems_other = names(base), names(other)
    mem_diff = {"+" + n for n in mems_other - mems_base} | {"-" + n for n in mems_base - mems_other}
    assert mem_diff == ({memory} if memory else set())
    if "momentum" in flag:
        assert base.init_state(1).memory.momentum is not None and other.init_state(1).memory.momentum is None
    x = _x(seed, 16)
    y_base, _ = _call(base, x)
    y_other, _ = _call(other, x)
    assert rel_err(y_other, y_base) > 1e-4, seed  # the flag changes the function


def test_static_k_and_v_are_the_projections():
    """With adaptive_k/v off, k and v are exactly the conv paths, k l2-normalised, v raw (the
    default; test_paper_literal.py covers normalize_values=True)."""
    layer = _layer(0, adaptive_k=False, adaptive_v=False)
    x = _x(0, 8)
    z, beta, _ = layer.paths(x, layer.init_state(2).conv)
    blocks = jax.tree.map(lambda a: jnp.swapaxes(a, 1, 2), (z, beta))
    q, k, v, _ = layer.generate(layer.init_state(2).memories.boundary, *blocks)
    unit = lambda u: u / jnp.sqrt(jnp.sum(u * u, axis=-1, keepdims=True) + 1e-6)  # noqa: E731
    assert rel_err(k, unit(blocks[0]["k"])) < 1e-6
    assert rel_err(v, blocks[0]["v"]) < 1e-6


@pytest.mark.parametrize("memory_inputs", ["shared", "projected"])
def test_generate_reads_each_memory_with_its_own_weights_and_input(memory_inputs):
    """`generate` reads the small memories in one batched apply; each read must be that memory's
    own boundary weights applied to its own path (one apply per memory, as written out here). The
    memories get distinct random weights, so a read from the wrong one shows."""
    from nl_jax.memory.ops import structures as st  # noqa: PLC0415

    seed = fresh_seed()
    layer = _layer(seed, memory_inputs=memory_inputs)
    x = _x(seed, 8)
    z, beta, _ = layer.paths(x, layer.init_state(2).conv)
    z, beta = jax.tree.map(lambda a: jnp.swapaxes(a, 1, 2), (z, beta))
    boundary = layer.init_state(2).memories.boundary
    keys = iter(jax.random.split(jax.random.key(seed + 11), 8))
    boundary = jax.tree.map(lambda w: w + 0.3 * jax.random.normal(next(keys), w.shape), boundary)
    q, k, v, rates = layer.generate(boundary, z, beta)

    def read(name):
        i = layer.small.index(name)
        return st.apply(layer.spec, jax.tree.map(lambda w: w[i], boundary), z[name])

    unit = lambda u: u / jnp.sqrt(jnp.sum(u * u, axis=-1, keepdims=True) + 1e-6)  # noqa: E731
    readout = lambda u, r, b: jnp.einsum("bhnd,hd->bhn", u, r[...]) + b[...][:, None]  # noqa: E731
    eta = MAX_LR * jax.nn.sigmoid(readout(read("eta"), layer.eta_readout, layer.eta_bias))
    alpha = jax.nn.sigmoid(readout(read("alpha"), layer.alpha_readout, layer.alpha_bias))
    assert rel_err(k, unit(read("k"))) < 1e-6, seed
    assert rel_err(v, read("v")) < 1e-6, seed
    assert rel_err(q, unit(z["q"])) < 1e-6, seed  # q static by default
    assert rel_err(rates.lr, eta) < 1e-6, seed
    assert rel_err(rates.retention, alpha) < 1e-6, seed


def test_saturated_retention_equals_no_weight_decay():
    """weight_decay=True with alpha forced to exactly 1 computes what weight_decay=False does."""
    seed = fresh_seed()
    off = _layer(seed, chunk_size=2, memory_chunk_size=8, weight_decay=False)
    on = _like(off, weight_decay=True)
    on.alpha_bias[...] = jnp.full(on.alpha_bias.shape, 1e4)  # sigmoid(1e4) == 1.0 in float32
    on.alpha_readout[...] = jnp.zeros(on.alpha_readout.shape)
    x = _x(seed, 16)
    assert rel_err(_call(on, x)[0], _call(off, x)[0]) < 1e-6, seed


def test_memories_stay_bounded_with_rates_at_their_bounds():
    """eta pinned at max_lr, retention at 1, inputs and projections far off their init: the fast
    weights stay bounded over a long stream (the unbounded rate and raw values of the paper's form
    went to NaN here, as hope_tiny did on real text)."""
    seed = fresh_seed()
    layer = SelfModifyingTitans(D, 2, 8, rngs=nnx.Rngs(seed), chunk_size=8, memory_chunk_size=16)
    assert layer.spec.max_grad_norm == layer.out_spec.max_grad_norm == 1.0  # the default clips
    layer.eta_bias[...] = jnp.full(layer.eta_bias.shape, 20.0)
    layer.alpha_bias[...] = jnp.full(layer.alpha_bias.shape, 20.0)
    for proj in (layer.in_proj,):  # the one input every memory reads (memory_inputs="shared")
        proj.kernel[...] = proj.kernel[...] * 100
    length = 256
    x = 10 * _x(seed, length)
    start = layer.init_state(2)
    y, state = _call(layer, x, start)
    largest = lambda st: max(  # noqa: E731
        float(jnp.abs(w).max()) for s in (st.memories, st.memory) for w in jax.tree.leaves(s.weights)
    )
    assert bool(jnp.isfinite(y).all()), seed
    # each clipped token moves a memory by at most max_lr * max_grad_norm (retention 1 lets the
    # steps add up); the unbounded form reached 1e13 within 50 tokens
    assert largest(state) < largest(start) + length * layer.max_lr * layer.spec.max_grad_norm, seed
    with pytest.raises(ValueError, match=r"max_lr must be in \(0, 1\]"):
        SelfModifyingTitans(D, 2, 8, rngs=nnx.Rngs(0), max_lr=1.5)


# ------------------------------------------------------------------- linear memory = gated delta rule


def test_linear_memories_are_a_gated_delta_rule_with_modified_values():
    """structure="linear", no momentum: every memory follows S_t = a_t S_{t-1}(I - b_t k k^T) + b_t u_t k^T
    with b = eta / alpha and u = alpha (v_hat - S_B k), v_hat = S_B v (Eq. 92-93 of the paper), here in
    numpy float64 token by token, reads and rates from the boundary states."""
    seed = fresh_seed()
    c_small, c_mem = 2, 4
    layer = _layer(seed, structure="linear", momentum=False, chunk_size=c_small, memory_chunk_size=c_mem)
    x = _x(seed, 12)
    y, state = _call(layer, x, layer.init_state(2))
    y_core, _ = nnx.jit(lambda m, x, s: m.core(x, s))(layer, x, layer.init_state(2))

    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    z, _, _ = layer.paths(x, layer.init_state(2).conv)
    z = {n: f64(a) for n, a in z.items()}  # [B, T, H, dh]
    init = layer.init_state(2)
    mems = {n: f64(s.weights.w) for n, s in layer.small_states(init.memories).items()}  # [B, H, dh, dh]
    mems["out"] = f64(init.memory.weights.w)
    bound = dict(mems)
    r = {n: f64(getattr(layer, n)[...]) for n in ("eta_readout", "eta_bias", "alpha_readout", "alpha_bias")}
    mv = lambda w, u: np.einsum("bhoi,bhi->bho", w, u)  # noqa: E731
    unit = lambda u: u / np.sqrt(np.sum(u * u, -1, keepdims=True) + 1e-6)  # noqa: E731
    sigmoid = lambda u: 1 / (1 + np.exp(-u))  # noqa: E731
    ys = []
    for t in range(x.shape[1]):
        k = unit(mv(bound["k"], z["k"][:, t]))
        v = mv(bound["v"], z["v"][:, t])  # raw, the default (normalize_values=False)
        q = unit(z["q"][:, t])
        eta = MAX_LR * sigmoid(
            np.einsum("bhd,hd->bh", mv(bound["eta"], z["eta"][:, t]), r["eta_readout"]) + r["eta_bias"]
        )
        alpha = sigmoid(
            np.einsum("bhd,hd->bh", mv(bound["alpha"], z["alpha"][:, t]), r["alpha_readout"])
            + r["alpha_bias"]
        )
        ys.append(mv(bound["out"], q))  # read="boundary" (Eq. 90)
        beta = (eta / alpha)[..., None, None]
        eye = np.eye(k.shape[-1])
        for n in mems:
            u = alpha[..., None] * (mv(bound[n], v) - mv(bound[n], k))  # modified values
            mems[n] = alpha[..., None, None] * mems[n] @ (eye - beta * np.einsum("bhi,bhj->bhij", k, k))
            mems[n] = mems[n] + beta * np.einsum("bho,bhi->bhoi", u, k)
        for n in mems:  # boundaries after the update of the chunk's last token
            if (t + 1) % (c_mem if n == "out" else c_small) == 0:
                bound[n] = mems[n]
    assert rel_err(y_core, np.stack(ys, 1)) < TOL, seed
    for n, s in layer.small_states(state.memories).items():
        assert rel_err(s.weights.w, mems[n]) < TOL, (n, seed)
    assert rel_err(state.memory.weights.w, mems["out"]) < TOL, seed
    assert rel_err(y, _call(layer, x)[0]) < TOL, seed


# ----------------------------------------------------------------------------------- input checks


def test_bad_input_is_named():
    layer = _layer(0, chunk_size=4, memory_chunk_size=8)
    with pytest.raises(ValueError, match="memory_chunk_size 8 does not divide the sequence length 12"):
        layer(_x(0, 12))
    with pytest.raises(ValueError, match="chunk_size 4 does not divide the sequence length 6"):
        layer(_x(0, 6))
    with pytest.raises(ValueError, match="memory_chunk_size 8 does not divide the sequence length 12"):
        layer(_x(0, 12), layer.init_state(2), aligned=True)  # 12 neither fills nor divides a chunk of 8
    with pytest.raises(ValueError, match=r"expects x \[B, T, 16\]"):
        layer(jnp.zeros((2, 8, 12)))
    with pytest.raises(ValueError, match="read must be one of"):
        SelfModifyingTitans(D, 2, 4, read="post_update", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="memory_chunk_size must be a positive integer"):
        SelfModifyingTitans(D, 2, 4, memory_chunk_size=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="memory_target"):
        SelfModifyingTitans(D, 2, 4, memory_target="other", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="memory structure"):
        SelfModifyingTitans(D, 2, 4, structure="conv", rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "structure,read,momentum", [("mlp", "per_token", True), ("linear", "boundary", False)]
)
def test_flops_helper_against_xla_count(structure, read, momentum):
    """The analytic count against XLA's count of the lowered (not yet optimised) forward; scan bodies
    are counted once, so T equals both chunk sizes. The forward runs from a state and returns the
    new one: a training forward over one chunk returns y alone, and its updates, which nothing reads,
    are dead code. XLA also counts the elementwise work the helper leaves out."""
    kw = dict(
        chunk_size=16, memory_chunk_size=16, read=read, hidden=32, structure=structure, momentum=momentum
    )
    layer = SelfModifyingTitans(64, 2, 32, rngs=nnx.Rngs(0), **kw)
    x = jnp.zeros((1, 16, 64))
    graphdef, params = nnx.split(layer)
    forward = lambda p, x, s: nnx.merge(graphdef, p)(x, s, aligned=True)  # noqa: E731
    xla = jax.jit(forward).lower(params, x, layer.init_state(1)).cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    ours = self_modifying_cost.forward_flops_per_token(16, 64, 2, 32, **kw) * 16
    assert 0.7 < ours / xla["flops"] < 1.05, (ours, xla["flops"])
    fewer = self_modifying_cost.forward_flops_per_token(
        16, 64, 2, 32, **{**kw, "adaptive_k": False, "dgd": False}
    )
    assert fewer < ours / 16
