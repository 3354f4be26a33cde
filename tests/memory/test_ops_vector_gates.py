"""Vector gates of the memory ops (update_rule: a decay per key channel, the two-vector DGD term of RWKV-7's
generalised delta rule): every form against a float64 loop written from the recurrence, the chunked
form against the token-by-token one on gradients, and against the scalar-gate path where they meet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.memory import ops
from nl_jax.memory.ops import presets
from tests.memory.inputs import fresh_seed, max_tree_rel_err, rel_err, unit

TOL = 1e-5


def _inputs(seed, *, batch=2, length=16, heads=2, dk=8, dv=6, zero_decays=False, scalar_decay=False):
    ks = jax.random.split(jax.random.key(seed), 9)
    shape = (batch, length, heads, dk)
    q, k = unit(jax.random.normal(ks[0], shape)), unit(jax.random.normal(ks[1], shape))
    v = jax.random.normal(ks[2], (batch, length, heads, dv))
    decay = 0.5 + 0.5 * jax.nn.sigmoid(jax.random.normal(ks[3], shape))
    if zero_decays:  # whole tokens that forget everything, as a document restart does
        decay = decay.at[:, 5].set(0.0).at[:, 11, :, : dk // 2].set(0.0)
    if scalar_decay:  # one decay per head with a separate erase key (Comba)
        decay = decay[..., 0]
    c = unit(jax.random.normal(ks[4], shape))
    d = c * jax.nn.sigmoid(jax.random.normal(ks[5], shape))  # c times a rate in (0, 1), as RWKV-7
    gate = lambda key: jax.nn.sigmoid(jax.random.normal(key, (batch, length, heads)))  # noqa: E731
    rates = ops.Rates(lr=gate(ks[6]), retention=decay, dgd=gate(ks[7]), erase_key=c, erase_dir=d)
    w0 = 0.3 * jax.random.normal(ks[8], (batch, heads, dv, dk))
    return ops.init_state(ops.LinearWeights(w0), momentum=False), q, k, v, rates


def _reference(state, q, k, v, rates, read):
    """The recurrence in float64, token by token (dot objective: the write is +lr v k^T)."""
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    w = f(state.weights.w).copy()
    q, k, v = f(q), f(k), f(v)
    fields = (rates.lr, rates.retention, rates.dgd, rates.erase_key, rates.erase_dir)
    lr, alpha, gamma, c, d = (f(x) for x in fields)
    b, t, h, _ = q.shape
    y = np.zeros((b, t, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            s = w[bi, hi]
            for ti in range(t):
                prev = s
                p = prev @ c[bi, ti, hi]
                decay = np.broadcast_to(alpha[bi, ti, hi], k.shape[-1:])  # a scalar decay on every channel
                s = prev * decay[None, :] - gamma[bi, ti, hi] * np.outer(p, d[bi, ti, hi])
                s = s + lr[bi, ti, hi] * np.outer(v[bi, ti, hi], k[bi, ti, hi])
                y[bi, ti, hi] = (s if read == "post_update" else prev) @ q[bi, ti, hi]
            w[bi, hi] = s
    return y, w


def _run(form, state, q, k, v, rates, chunk, read, spec=ops.MemorySpec("linear", "dot")):
    fn = {"naive": ops.memory_naive, "chunked": ops.memory_chunked}[form]
    return fn(spec, state, q, k, v, rates, chunk_size=chunk, read=read)


@pytest.mark.parametrize("form,chunk", [("naive", 1), ("chunked", 1), ("chunked", 4), ("chunked", 16)])
@pytest.mark.parametrize("read", ["post_update", "per_token"])
@pytest.mark.parametrize("decay", ["vector", "scalar"])
def test_forms_equal_the_float64_recurrence(form, chunk, read, decay):
    seed = fresh_seed()
    state, q, k, v, rates = _inputs(seed, scalar_decay=decay == "scalar")
    y_ref, w_ref = _reference(state, q, k, v, rates, read)
    y, s = _run(form, state, q, k, v, rates, chunk, read)
    assert rel_err(y, jnp.asarray(y_ref, jnp.float32)) < TOL, seed
    assert rel_err(s.weights.w, jnp.asarray(w_ref, jnp.float32)) < TOL, seed


def test_exact_zero_decays_stay_exact_in_the_chunked_form():
    """A decay of exactly 0 (a restart) is exact in value and leaves every gradient finite."""
    seed = fresh_seed()
    state, q, k, v, rates = _inputs(seed, zero_decays=True)
    y_ref, w_ref = _reference(state, q, k, v, rates, "post_update")
    y, s = _run("chunked", state, q, k, v, rates, 8, "post_update")
    assert rel_err(y, jnp.asarray(y_ref, jnp.float32)) < TOL, seed
    assert rel_err(s.weights.w, jnp.asarray(w_ref, jnp.float32)) < TOL, seed
    grads = jax.grad(lambda r: jnp.sum(_run("chunked", state, q, k, v, r, 8, "post_update")[0]))(rates)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)), seed


def _loss(form, chunk, read, spec, cot_y, cot_w):
    def loss(state, q, k, v, rates):
        y, s = _run(form, state, q, k, v, rates, chunk, read, spec)
        return jnp.sum(y * cot_y) + jnp.sum(s.weights.w * cot_w)

    return loss


@pytest.mark.parametrize(
    "objective,chunk,read,decay",
    [
        ("dot", 4, "post_update", "vector"),
        ("l2", 4, "per_token", "vector"),
        ("l2", 8, "post_update", "vector"),
        ("dot", 8, "post_update", "scalar"),
        ("l2", 4, "per_token", "scalar"),
    ],
)
def test_chunked_equals_naive_on_gradients(objective, chunk, read, decay):
    """Gradients wrt the initial state, q, k, v and every rate (the l2 objective with the same
    mini-batch semantics in both forms: errors at the chunk's boundary state)."""
    seed = fresh_seed()
    spec = ops.MemorySpec("linear", objective)
    state, q, k, v, rates = _inputs(seed, length=24, scalar_decay=decay == "scalar")
    ks = jax.random.split(jax.random.key(seed + 1), 2)
    cot_y = jax.random.normal(ks[0], v.shape)
    cot_w = jax.random.normal(ks[1], state.weights.w.shape)
    args = (state, q, k, v, rates)
    y_n, s_n = _run("naive", *args, chunk, read, spec)
    y_c, s_c = _run("chunked", *args, chunk, read, spec)
    assert rel_err(y_c, y_n) < TOL and rel_err(s_c.weights.w, s_n.weights.w) < TOL, seed
    grads = {}
    for form in ("naive", "chunked"):
        loss = _loss(form, chunk, read, spec, cot_y, cot_w)
        # the initial state through its weights (init_state also makes them the boundary copy)
        of_all = lambda w, *xs: loss(ops.init_state(w, momentum=False), *xs)  # noqa: E731
        grads[form] = jax.grad(of_all, argnums=tuple(range(5)))(state.weights, *args[1:])
    assert max_tree_rel_err(grads["chunked"], grads["naive"]) < TOL, seed


def test_recurrent_steps_equal_naive():
    seed = fresh_seed()
    state, q, k, v, rates = _inputs(seed, length=10)
    spec = ops.MemorySpec("linear", "dot")
    y_ref, s_ref = _run("naive", state, q, k, v, rates, 1, "post_update")
    s, ys = state, []
    for t in range(q.shape[1]):
        at = lambda x: x[:, t]  # noqa: E731
        y, s = ops.memory_recurrent(spec, s, at(q), at(k), at(v), jax.tree.map(at, rates), read="post_update")
        ys.append(y)
    assert rel_err(jnp.stack(ys, 1), y_ref) < TOL, seed
    assert rel_err(s.weights.w, s_ref.weights.w) < TOL, seed


def test_vector_gates_with_equal_channels_equal_the_scalar_path():
    """A decay equal on every channel and c = d = k is the gated delta rule's scalar closed form."""
    seed = fresh_seed()
    state, q, k, v, rates = _inputs(seed)
    scalar = ops.Rates(lr=rates.lr, retention=rates.retention[..., 0], dgd=rates.dgd)
    channels = jnp.broadcast_to(scalar.retention[..., None], k.shape)
    vector = scalar._replace(retention=channels, erase_key=k, erase_dir=k)
    y_s, s_s = _run("chunked", state, q, k, v, scalar, 4, "post_update")
    y_v, s_v = _run("chunked", state, q, k, v, vector, 4, "post_update")
    assert rel_err(y_v, y_s) < TOL and rel_err(s_v.weights.w, s_s.weights.w) < TOL, seed


def test_preset_is_rwkv7_update():
    """presets.generalized_delta_rule: S_t = S_{t-1}(diag(w) - c d^T) + v k^T, read after the update."""
    seed = fresh_seed()
    state, q, k, v, rates = _inputs(seed)
    m = presets.generalized_delta_rule(rates.retention, rates.erase_key, rates.erase_dir)
    ones = rates._replace(lr=jnp.ones_like(rates.lr), dgd=jnp.ones_like(rates.dgd))
    y_ref, w_ref = _reference(state, q, k, v, ones, "post_update")
    y, s = ops.memory_chunked(m.spec, state, q, k, v, m.rates, chunk_size=8, read=m.read)
    assert m.read == "post_update"
    assert rel_err(y, jnp.asarray(y_ref, jnp.float32)) < TOL, seed
    assert rel_err(s.weights.w, jnp.asarray(w_ref, jnp.float32)) < TOL, seed


def test_unsupported_calls_raise():
    state, q, k, v, rates = _inputs(0, length=8)
    lin = ops.MemorySpec("linear", "dot")
    with pytest.raises(ValueError, match="impl='xla'"):
        ops.memory_chunked(lin, state, q, k, v, rates, chunk_size=4, impl="pallas")
    with pytest.raises(ValueError, match="memory_stream does not cover vector gates"):
        ops.memory_stream(lin, state, q, k, v, rates, chunk_size=4)
    with pytest.raises(ValueError, match="need rates.dgd"):
        ops.memory_naive(lin, state, q, k, v, rates._replace(dgd=None))
    mlp = ops.MemorySpec("mlp", "dot")
    mlp_state = ops.init_state(ops.init_weights(mlp, jax.random.key(0), (2, 2), 8), momentum=False)
    with pytest.raises(ValueError, match="linear memory without bias"):
        ops.memory_naive(mlp, mlp_state, q, k, q, rates)


def test_comba_preset_is_its_recurrence():
    """presets.comba: S_t = alpha S_{t-1} (I - beta p k^T) + beta v k^T, in float64 beside the op."""
    seed = fresh_seed()
    state, q, k, v, rates = _inputs(seed, scalar_decay=True)
    alpha, beta, p = rates.retention, rates.lr, rates.erase_key
    m = presets.comba(alpha, beta, p)
    y, s = ops.memory_chunked(m.spec, state, q, k, v, m.rates, chunk_size=8, read=m.read)
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    w = f(state.weights.w).copy()
    want = np.zeros(v.shape)
    for bi in range(q.shape[0]):
        for hi in range(q.shape[2]):
            S = w[bi, hi]
            for t in range(q.shape[1]):
                a, b = f(alpha)[bi, t, hi], f(beta)[bi, t, hi]
                kt, pt = f(k)[bi, t, hi], f(p)[bi, t, hi]
                S = a * S @ (np.eye(len(kt)) - b * np.outer(pt, kt)) + b * np.outer(f(v)[bi, t, hi], kt)
                want[bi, t, hi] = S @ f(q)[bi, t, hi]
            w[bi, hi] = S
    assert rel_err(y, jnp.asarray(want, jnp.float32)) < TOL, seed
    assert rel_err(s.weights.w, jnp.asarray(w, jnp.float32)) < TOL, seed
