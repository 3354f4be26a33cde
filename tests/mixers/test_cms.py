"""The Continuum Memory System: every variant against a token-by-token reference written from the
definition, streaming at any offset, update cadence, the ntp accumulation, and the static `none`
signal as an ordinary MLP stack."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nl_jax.layers import RMSNorm, SwiGLU
from nl_jax.mixers.cms import LOCAL_MAX_GRAD_NORM, ContinuumMemory
from tests.memory.inputs import fresh_seed

D, HID, PERIODS, LR = 16, (8, 12), (2, 4), (0.5, 0.3)
VARIANTS = ("sequential", "independent", "nested")


def _cms(seed, variant="sequential", signal="local", **kw):
    kw = dict(dict(hidden=HID, periods=PERIODS, inner_lr=LR), **kw)
    return ContinuumMemory(D, variant=variant, signal=signal, rngs=nnx.Rngs(seed), **kw)


@nnx.jit
def _call(cms, x, state=None):
    return cms(x, state)


# ---------------------------------------------------------------- the slow reference
def _mlp(w, u):
    return (jax.nn.silu(u @ w["gate"]) * (u @ w["up"])) @ w["down"]


def _rms(u, scale):
    return u * jax.lax.rsqrt(jnp.mean(u * u, -1, keepdims=True) + 1e-6) * scale


def reference_local(cms: ContinuumMemory, x):
    """Token by token, one sequence at a time, every quantity from the definition in cms.py:
    g_t = grad 1/2 ||MLP(u_{t-1}) - u_t||^2 clipped to norm LOCAL_MAX_GRAD_NORM, summed over the
    period, applied at its end; nested levels re-initialised from I_l at the next level's boundaries.
    Returns outputs, final weights and whether each term was clipped."""
    k = cms.num_levels
    scales = [lvl.norm.scale[...] for lvl in cms.levels]
    w0 = [{n: getattr(lvl.mlp, n).kernel[...] for n in ("gate", "up", "down")} for lvl in cms.levels]
    agg = cms.agg[...] if cms.variant == "independent" else None
    ys, finals, clipped = [], [], []
    for b in range(x.shape[0]):
        w = list(w0)
        g = [jax.tree.map(jnp.zeros_like, wi) for wi in w]
        init, h = list(w0), [jax.tree.map(jnp.zeros_like, wi) for wi in w]
        prev = [None] * k
        out_b = []
        for t in range(x.shape[1]):
            z = x[b, t]
            outs = []
            for i in range(k):
                u = _rms(x[b, t] if cms.variant == "independent" else z, scales[i])
                o = _mlp(w[i], u)
                if prev[i] is not None:
                    gi = jax.grad(lambda wi: 0.5 * jnp.sum((_mlp(wi, prev[i]) - u) ** 2))(w[i])
                    norm = jnp.sqrt(sum(jnp.sum(a * a) for a in jax.tree.leaves(gi)))
                    gi = jax.tree.map(lambda a: a * jnp.minimum(1.0, LOCAL_MAX_GRAD_NORM / norm), gi)
                    clipped.append(bool(norm > LOCAL_MAX_GRAD_NORM))
                    g[i] = jax.tree.map(jnp.add, g[i], gi)
                    h[i] = jax.tree.map(jnp.add, h[i], gi)
                prev[i] = u
                outs.append(o)
                if cms.variant != "independent":
                    z = z + o
            out_b.append(x[b, t] + sum(a * o for a, o in zip(agg, outs)) if agg is not None else z)
            n = t + 1
            for i in range(k):
                if n % cms.periods[i] == 0:
                    w[i] = jax.tree.map(lambda a, c: a - cms.inner_lr[i] * c, w[i], g[i])
                    g[i] = jax.tree.map(jnp.zeros_like, g[i])
                if cms.variant == "nested" and i < k - 1 and n % cms.periods[i + 1] == 0:
                    init[i] = jax.tree.map(lambda a, c: a - cms.inner_lr[i + 1] * c, init[i], h[i])
                    h[i] = jax.tree.map(jnp.zeros_like, h[i])
                    w[i] = init[i]
        ys.append(jnp.stack(out_b))
        finals.append(w)
    return jnp.stack(ys), [jax.tree.map(lambda *a: jnp.stack(a), *lv) for lv in zip(*finals)], clipped


def _close(a, b, tol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


# ---------------------------------------------------------------- local signal
@pytest.mark.parametrize("variant", VARIANTS)
def test_local_signal_equals_the_token_by_token_reference(variant):
    seed = fresh_seed()
    cms = _cms(seed, variant, init_std=0.07)  # weights large enough that some terms are clipped
    x = jax.random.normal(jax.random.key(seed), (2, 11, D))  # 11: ends inside every period
    y_ref, w_ref, clipped = reference_local(cms, x)
    assert 0 < sum(clipped) < len(clipped), "the inputs must exercise both sides of the clip"
    y, state = _call(cms, x, cms.init_state(2))
    _close(y, y_ref)
    _close(ContinuumMemory.fast_weights(state), w_ref)
    y_train, none = _call(cms, x)  # the training call starts from the meta-learned init
    assert none is None
    _close(y_train, y_ref)
    # the updates matter: the static read of the same levels differs
    assert float(jnp.abs(y - cms.static(x)).max()) > 1e-4, seed


@pytest.mark.parametrize("variant", VARIANTS)
def test_streaming_in_uneven_pieces_equals_one_call(variant):
    seed = fresh_seed()
    cms = _cms(seed, variant)
    x = jax.random.normal(jax.random.key(seed), (2, 13, D))
    y, full = _call(cms, x, cms.init_state(2))
    state, ys = cms.init_state(2), []
    for lo, hi in [(0, 3), (3, 4), (4, 9), (9, 13)]:  # pieces start off the period grid
        yi, state = _call(cms, x[:, lo:hi], state)
        ys.append(yi)
    _close(jnp.concatenate(ys, 1), y)
    _close(state, full)
    assert int(state.pos) == 13


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_change_only_at_their_boundaries(variant):
    cms = _cms(fresh_seed(), variant)
    x = jax.random.normal(jax.random.key(1), (1, 12, D))
    state = cms.init_state(1)
    before = ContinuumMemory.fast_weights(state)
    for t in range(12):
        _, state = _call(cms, x[:, t : t + 1], state)
        after = ContinuumMemory.fast_weights(state)
        for i, p in enumerate(cms.periods):
            changed = any(
                bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(after[i]), jax.tree.leaves(before[i]))
            )
            boundary = (t + 1) % p == 0
            if variant == "nested" and i < cms.num_levels - 1:
                boundary = boundary or (t + 1) % cms.periods[i + 1] == 0
            assert changed == boundary, (variant, i, t)
        before = after


# ---------------------------------------------------------------- ntp signal: the layer side
def test_ntp_reads_its_state_and_accumulates_on_the_schedule():
    """ntp: the layer is a read with the state's weights; `accumulate` sums segment gradients and
    applies lr * sum at each level's boundary (and nothing else)."""
    seed = fresh_seed()
    cms = _cms(seed, "sequential", "ntp")
    x = jax.random.normal(jax.random.key(seed), (2, 5, D))
    state = cms.init_state(2)
    y, same = _call(cms, x, state)
    _close(same, state)  # ntp: the layer only reads; the model accumulates
    _close(y, cms.static(x), 1e-5)  # the initial fast weights are the static levels
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    w0 = ContinuumMemory.fast_weights(state)
    sums = [jax.tree.map(jnp.zeros_like, w) for w in w0]
    expected = list(w0)
    acc = jax.jit(lambda s, g: cms.accumulate(s, g, 2))
    for seg in range(4):  # segments of min(periods) = 2 tokens
        grads = tuple(jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape), w) for w in w0)
        state = acc(state, grads)
        end = 2 * (seg + 1)
        for i, p in enumerate(cms.periods):
            sums[i] = jax.tree.map(jnp.add, sums[i], grads[i])
            if end % p == 0:
                expected[i] = jax.tree.map(lambda w, g: w - cms.inner_lr[i] * g, expected[i], sums[i])
                sums[i] = jax.tree.map(jnp.zeros_like, sums[i])
        _close(ContinuumMemory.fast_weights(state), expected)
        _close([lv["grad_sum"] for lv in state.levels], sums)


def test_ntp_read_with_updated_weights_differs_from_the_init():
    cms = _cms(fresh_seed(), "independent", "ntp")
    x = jax.random.normal(jax.random.key(0), (2, 4, D))
    state = cms.init_state(2)
    grads = tuple(jax.tree.map(jnp.ones_like, w) for w in ContinuumMemory.fast_weights(state))
    moved = cms.accumulate(cms.accumulate(state, grads, 2), grads, 2)  # one boundary of each level
    assert float(jnp.abs(_call(cms, x, moved)[0] - _call(cms, x, state)[0]).max()) > 1e-3


# ---------------------------------------------------------------- none: a static MLP stack
@pytest.mark.parametrize("variant", ("sequential", "independent"))
def test_signal_none_is_exactly_a_static_mlp_stack(variant):
    seed = fresh_seed()
    cms = _cms(seed, variant, "none")
    params = nnx.state(cms, nnx.Param)
    n = sum(math.prod(a.shape) for a in jax.tree.leaves(params))
    assert n == sum(D + 3 * D * h for h in HID) + (len(HID) if variant == "independent" else 0)
    assert cms.init_state(2) is None
    # the same parameters in plain RMSNorm + SwiGLU modules, applied as pre-norm residual sublayers
    rngs = nnx.Rngs(0)
    norms = [RMSNorm(D) for _ in HID]
    mlps = [SwiGLU(D, h, rngs=rngs) for h in HID]
    for i, lvl in enumerate(cms.levels):
        nnx.update(norms[i], nnx.state(lvl.norm))
        nnx.update(mlps[i], nnx.state(lvl.mlp))
    x = jax.random.normal(jax.random.key(seed), (2, 7, D))
    if variant == "sequential":
        want = x
        for norm, mlp in zip(norms, mlps):
            want = want + mlp(norm(want))
    else:
        want = x + sum(a * mlp(norm(x)) for a, norm, mlp in zip(cms.agg[...], norms, mlps))
    y, state = _call(cms, x)
    assert state is None
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)  # up to jit vs eager rounding


def test_bad_configurations_are_rejected():
    with pytest.raises(ValueError, match="variant 'chain'"):
        _cms(0, "chain")
    with pytest.raises(ValueError, match="signal 'grad'"):
        _cms(0, signal="grad")
    with pytest.raises(ValueError, match="one hidden width, period and inner lr per level"):
        _cms(0, hidden=(8,))
    with pytest.raises(ValueError, match="multiple of it"):
        _cms(0, signal="ntp", periods=(4, 6))
    with pytest.raises(ValueError, match="divide the next"):
        _cms(0, "nested", periods=(2, 3), hidden=(4, 4))
