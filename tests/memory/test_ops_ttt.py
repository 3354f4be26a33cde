"""The memory core's options for the TTT inner model (Sun et al. 2024): fast biases, the inner
LayerNorm (l2 loss after it) and the per-token delta scale (TTT's token_idx).

* The `ttt` preset with all three equals ttt-lm-jax's mini-batch dual form (`process_mini_batch`
  of TTTLinear / TTTMLP), transcribed here in float64 numpy: outputs and final fast weights.
* Every form agrees with the token-by-token reference `memory_naive` with these options: outputs,
  final state (biases included) and gradients with respect to every input, the initial state and
  the LayerNorm parameters (chunked), and outputs and state (streaming, decode steps).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.memory import ops
from nl_jax.memory.ops import presets
from tests.memory.inputs import fresh_seed, make_inputs, max_tree_rel_err, rel_err
from tests.memory.ttt_reference import dual_form

TOL = 1e-5


def _jit(f, **kw):
    """jit with LLVM optimisation off: these tests compile far more than they run."""
    return jax.jit(f, compiler_options={"xla_backend_optimization_level": 0}, **kw)


@pytest.mark.parametrize("layer", ["linear", "mlp"])
def test_ttt_preset_is_the_ttt_lm_jax_dual_form(layer):
    seed = fresh_seed()
    b, t, h, d, c = 1, 8, 2, 4, 4
    hid = 4 * d
    ks = iter(jax.random.split(jax.random.key(seed), 12))
    rnd = lambda shape, s=1.0: s * jax.random.normal(next(ks), shape)  # noqa: E731
    xq, xk, xv = rnd((b, t, h, d)), rnd((b, t, h, d)), rnd((b, t, h, d))
    lr = 0.5 * jax.nn.sigmoid(rnd((b, t, h)))  # base_lr * sigmoid(x theta) / head_dim
    # learnable_token_idx, small enough to keep the last position's scale positive; position 2 clips to 0
    offsets = 0.1 * jnp.tanh(rnd((c,))).at[2].set(-10.0)
    pos = jnp.arange(t) % c
    tau = jnp.broadcast_to(jnp.maximum(1.0 / (pos + 1.0) + offsets[pos], 0.0)[None, :, None], lr.shape)
    g, beta = 1 + rnd((h, d), 0.3), rnd((h, d), 0.3)  # ttt_norm scale and bias, per head
    if layer == "linear":
        w, bias = rnd((b, h, d, d), 0.3), rnd((b, h, d, 1), 0.3)  # core layout [out, in]
        weights = ops.LinearBiasWeights(w, bias)
        ttt_params = (jnp.swapaxes(w, -1, -2), jnp.swapaxes(bias, -1, -2))  # [in, out], [1, out]
        v = xv - xk  # TTT-Linear fits f(k) = LN(W k + b) to v - k and reads q + f(q)
    else:
        w1, w2 = rnd((b, h, d, hid), 0.3), rnd((b, h, hid, d), 0.3)  # core: output side w1
        b1, b2 = rnd((b, h, d, 1), 0.3), rnd((b, h, hid, 1), 0.3)
        weights = ops.MLPBiasWeights(w1, w2, b1, b2)
        tr = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
        ttt_params = (tr(w2), tr(w1), tr(b2), tr(b1))  # TTT's W1 (input side), W2, b1, b2
        v = xv  # the core's mlp memory is residual: k + LN(...) fitted to v
    m = presets.ttt(lr, layer, "gelu", bias=True, norm=True, token_scale=tau)
    y, final = ops.memory_chunked(
        m.spec, ops.init_state(weights, False), xq, xk, v, m.rates, chunk_size=c, read=m.read,
        norm=ops.InnerNorm(g, beta),
    )  # fmt: skip
    if layer == "linear":
        y = xq + y

    want_y = np.zeros((b, t, h, d))
    want_w = [np.zeros(p.shape) for p in ttt_params]
    for bi in range(b):
        for hi in range(h):
            head = lambda x: x[bi, :, hi]  # noqa: E731
            params, want_y[bi, :, hi] = dual_form(
                layer, [p[bi, hi] for p in ttt_params], head(xq), head(xk), head(xv), head(lr),
                head(tau), g[hi], beta[hi], c,
            )  # fmt: skip
            for i, p in enumerate(params):
                want_w[i][bi, hi] = p
    assert rel_err(y, jnp.asarray(want_y, jnp.float32)) < TOL, seed
    for got, want in zip(jax.tree.leaves(ttt_params_of(final.weights, layer)), want_w):
        assert rel_err(got, jnp.asarray(want, jnp.float32)) < TOL, seed
    # the inner loop acted on every fast weight, biases included
    for got, init in zip(ttt_params_of(final.weights, layer), ttt_params):
        assert rel_err(got, init) > 1e-3, seed


def ttt_params_of(weights, layer):
    """The core's weights in ttt-lm-jax's layout and order."""
    tr = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
    if layer == "linear":
        return (tr(weights.w), tr(weights.b))
    return (tr(weights.w2), tr(weights.w1), tr(weights.b2), tr(weights.b1))


# ---- every form against the token-by-token reference, with the new options ----


def _with_bias(spec, state, seed):
    key = jax.random.key(seed + 11)
    w = state.weights
    col = lambda i, x: 0.3 * jax.random.normal(jax.random.fold_in(key, i), (*x.shape[:-1], 1))  # noqa: E731
    if spec.structure == "linear":
        weights = ops.LinearBiasWeights(w.w, col(0, w.w))
    else:
        weights = ops.MLPBiasWeights(w.w1, w.w2, col(1, w.w1), col(2, w.w2))
    return ops.init_state(weights, momentum=state.momentum is not None)


CASES = [  # (structure, read, momentum / retention / dgd on); TTT-MLP end to end: tests/models/test_ttt.py
    pytest.param("linear", "post_update", False, id="ttt_linear"),
    pytest.param("mlp", "post_update", False, id="ttt_mlp", marks=pytest.mark.slow),
    pytest.param("mlp", "per_token", True, id="mlp_all_rules", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("structure,read,rules_on", CASES)
def test_forms_equal_naive_with_bias_norm_and_delta_scale(structure, read, rules_on):
    chunk = 4
    seed = fresh_seed()
    spec = ops.MemorySpec(structure, "l2", bias=True, norm=True)
    state, q, k, v, rates = make_inputs(
        seed, ops.MemorySpec(structure, "l2"), length=12, momentum=rules_on, retention=rules_on, dgd=rules_on
    )
    state = _with_bias(spec, state, seed)
    ks = jax.random.split(jax.random.key(seed + 5), 4)
    rates = rates._replace(delta_scale=1.5 * jax.nn.sigmoid(jax.random.normal(ks[0], rates.lr.shape)))
    h, d = q.shape[2:]
    norm = ops.InnerNorm(1 + 0.3 * jax.random.normal(ks[1], (h, d)), 0.3 * jax.random.normal(ks[2], (h, d)))
    kw = dict(chunk_size=chunk, read=read)

    def run(form, weights, q, k, v, rates, norm):
        st = ops.init_state(weights, momentum=rules_on)
        fn = {"naive": ops.memory_naive, "chunked": ops.memory_chunked}[form]
        return fn(spec, st, q, k, v, rates, norm=norm, **kw)

    args = (state.weights, q, k, v, rates, norm)
    y_ref, s_ref = _jit(run, static_argnums=0)("naive", *args)
    y, s = _jit(run, static_argnums=0)("chunked", *args)
    assert rel_err(y, y_ref) < TOL, seed
    assert max_tree_rel_err(s, s_ref) < TOL, seed
    # the options act: the biases moved, and tau = 1 (plain reads) gives other outputs
    assert float(jnp.abs(jax.tree.leaves(s.weights)[-1] - jax.tree.leaves(state.weights)[-1]).max()) > 1e-3
    y_plain, _ = _jit(run, static_argnums=0)("chunked", *args[:4], rates._replace(delta_scale=None), norm)
    assert rel_err(y_plain, y) > 1e-3, seed

    cot_y = jax.random.normal(ks[3], y.shape)
    cot_w = jax.tree.map(lambda w: jax.random.normal(jax.random.fold_in(ks[3], w.size), w.shape), s.weights)

    def loss(form):
        def f(*args):
            y, s = run(form, *args)
            return jnp.sum(y * cot_y) + sum(
                jnp.sum(w * c) for w, c in zip(jax.tree.leaves(s.weights), jax.tree.leaves(cot_w))
            )

        return _jit(jax.grad(f, argnums=tuple(range(6))))

    g_ref, g = loss("naive")(*args), loss("chunked")(*args)
    for name, a, b in zip(["weights", "q", "k", "v", "rates", "norm"], g, g_ref):
        assert max_tree_rel_err(a, b) < TOL, (name, seed)
    assert float(jnp.abs(g[0].b if structure == "linear" else g[0].b2).max()) > 0  # biases are learned

    # streaming in two halves (the first ends inside a chunk, the second starts there, crosses a
    # chunk boundary and ends on one), and one decode step at a time
    stream = _jit(lambda s, *x: ops.memory_stream(spec, s, *x, norm=norm, **kw))
    ys, st = [], state
    for a in (0, 6):
        y_n, st = stream(st, *jax.tree.map(lambda x: x[:, a : a + 6], (q, k, v, rates)))
        ys.append(y_n)
    assert rel_err(jnp.concatenate(ys, 1), y_ref) < TOL, seed
    assert max_tree_rel_err(st, s_ref) < TOL, seed
    step = _jit(lambda s, *x: ops.memory_recurrent(spec, s, *x, norm=norm, **kw))
    ys, st = [], state
    for i in range(q.shape[1]):
        y_i, st = step(st, *jax.tree.map(lambda x: x[:, i], (q, k, v, rates)))
        ys.append(y_i)
    assert rel_err(jnp.stack(ys, 1), y_ref) < TOL, seed
    assert max_tree_rel_err(st, s_ref) < TOL, seed


def test_bias_and_norm_bad_inputs_are_named():
    spec = ops.MemorySpec("linear", "l2", bias=True, norm=True)
    state, q, k, v, rates = make_inputs(0, ops.MemorySpec("linear", "l2"), length=4, momentum=False)
    norm = ops.InnerNorm(jnp.ones((2, 8)), jnp.zeros((2, 8)))
    with pytest.raises(TypeError, match="linear memory with bias=True needs LinearBiasWeights"):
        ops.memory_naive(spec, state, q, k, v, rates, norm=norm)
    biased = ops.init_state(ops.init_weights(spec, jax.random.key(0), (2, 2), 8), momentum=False)
    assert biased.weights.b.shape == (2, 2, 8, 1) and float(jnp.abs(biased.weights.b).max()) == 0.0
    with pytest.raises(ValueError, match="needs its LayerNorm parameters"):
        ops.memory_chunked(spec, biased, q, k, v, rates, chunk_size=4)
    with pytest.raises(ValueError, match="without norm=True"):
        ops.memory_naive(ops.MemorySpec("linear", "l2"), state, q, k, v, rates, norm=norm)
    wide = biased._replace(weights=biased.weights._replace(b=jnp.zeros((2, 2, 8, 2))))
    with pytest.raises(ValueError, match="bias b must be"):
        ops.memory_chunked(spec, wide, q, k, v, rates, chunk_size=4, norm=norm)
