"""One conformance suite over every nl_jax.optim optimizer (after optax contrib/_common_test.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nl_jax import optim

# name -> (factory, kwargs, learning rate used by the conformance checks)
CASES = {
    "momentum_memory": (optim.momentum_memory, {"decay": 0.9}, 0.02),
    "preconditioned_momentum": (optim.preconditioned_momentum, {"decay": 0.9}, 0.003),
    "delta_momentum": (optim.delta_momentum, {"decay": 0.9, "beta": 0.5}, 0.02),
    "deep_momentum": (optim.deep_momentum, {"decay": 0.9}, 0.01),
    "muon": (optim.muon, {"beta": 0.9}, 0.02),
    "m3_ema": (optim.m3, {"period": 3}, 0.01),
    "m3_accumulate": (optim.m3, {"period": 3, "form": "accumulate"}, 0.03),
    "adam_memory": (optim.adam_memory, {}, 0.03),
    "delta_momentum_literal": (optim.delta_momentum, {"decay": 0.9, "beta": 0.002, "form": "literal"}, 0.02),
    "deep_momentum_gradient_key": (optim.deep_momentum, {"decay": 0.9, "key": "gradient"}, 0.01),
    "muon_anchored": (optim.muon, {"beta": 0.9, "ns_coeffs": "anchored"}, 0.02),
    # DGD's fixed point solves G = -S W, not G = 0 (its decay is part of the objective): small decay.
    "delta_gd": (optim.delta_gd, {"decay": 0.05}, 0.1),
    "feature_momentum": (optim.feature_momentum, {"decay": 0.9}, 0.02),
    "generalized_gd": (optim.generalized_gd, {"weights": (0.75, 0.25)}, 0.1),
    "generalized_momentum": (optim.generalized_gd, {"weights": (0.75, 0.25), "form": "momentum"}, 0.02),
    "adagrad_memory": (optim.adagrad_memory, {}, 0.1),
}
NAMES = sorted(CASES)
NO_PARAM_STATE = {"delta_gd"}  # its state is a step count only
# Least squares (300 steps): learning rate (float or schedule) and the required final/initial loss.
# NS outputs divided by sqrt(V) (M3) do not settle at a fixed step size, so M3 uses a cosine decay.
# The literal (accumulating) M3 of Algorithm 1 has no forgetting: its momenta integrate every past
# gradient, an undamped oscillator whose step only shrinks like 1/sqrt(t) (Algorithm 1 of the paper;
# docs/design.md, Decision 9); it is held to a 2x reduction, the decayed form to 100x.
CONVERGENCE = {name: (lr, 0.01) for name, (_, _, lr) in CASES.items()}
CONVERGENCE["m3_ema"] = (optax.cosine_decay_schedule(0.03, 300), 0.01)
CONVERGENCE["m3_accumulate"] = (optax.cosine_decay_schedule(0.03, 300), 0.5)
_TX, _JIT = {}, {}


def cached(name):
    """One transform and one jitted update per optimizer, shared by the tests (compile once)."""
    if name not in _TX:
        _TX[name] = make(name)
        _JIT[name] = jax.jit(_TX[name].update)
    return _TX[name], _JIT[name]


def make(name, lr=None, factory_wrapper=None):
    factory, kwargs, default_lr = CASES[name]
    factory = factory_wrapper(factory) if factory_wrapper else factory
    return factory(learning_rate=default_lr if lr is None else lr, **kwargs)


def toy_params(dtype=jnp.float32):
    rng = np.random.default_rng(0)  # numpy draws: no RNG kernels to compile in the tests
    shapes = {"w": ((8, 16), 0.3), "stack": ((2, 8, 16), 0.3), "b": ((16,), 0.1)}
    return {k: jnp.asarray(s * rng.standard_normal(shape), dtype) for k, (shape, s) in shapes.items()}


def toy_grads(params, step):
    rng = np.random.default_rng(1000 + step)
    return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


def run(tx, params, steps, update=None):
    update = update or jax.jit(tx.update)
    state = tx.init(params)
    outs = []
    for i in range(steps):
        u, state = update(toy_grads(params, i), state, params)
        params = optax.apply_updates(params, u)
        outs.append(u)
    return params, state, outs


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol
        ),
        a,
        b,
    )


@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager(name):
    tx, update = cached(name)
    p_eager, _, _ = run(tx, toy_params(), 1, update=tx.update)
    p_jit, _, _ = run(tx, toy_params(), 1, update=update)
    assert_close(p_eager, p_jit)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p_jit))


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams(name):
    tx, update = cached(name)
    itx = make(name, factory_wrapper=optax.inject_hyperparams)
    iupdate = jax.jit(itx.update)
    p_ref, _, _ = run(tx, toy_params(), 4, update=update)
    p_inj, state, _ = run(itx, toy_params(), 4, update=iupdate)
    assert_close(p_ref, p_inj)
    # The injected learning rate is live: setting it to 0 freezes the parameters.
    state.hyperparams["learning_rate"] = jnp.zeros_like(state.hyperparams["learning_rate"])
    u, _ = iupdate(toy_grads(toy_params(), 9), state, toy_params())
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))


@pytest.mark.parametrize("name", NAMES)
def test_schedule(name):
    lr = CASES[name][2]
    tx, update = cached(name)
    _, _, ref = run(tx, toy_params(), 1, update=update)
    # A schedule that starts at lr (first update as with a float lr) and reaches 0 at step 2.
    _, _, outs = run(make(name, optax.linear_schedule(lr, 0.0, 2)), toy_params(), 3)
    assert_close(outs[0], ref[0], rtol=1e-6, atol=1e-7)
    assert any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(outs[1]))
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(outs[2]))


@pytest.mark.parametrize("name", NAMES)
def test_multi_steps(name):
    params = toy_params()
    tx, update = cached(name)
    ms = optax.MultiSteps(tx, every_k_schedule=2)
    ms_update = jax.jit(ms.update)
    state = ms.init(params)
    g0, g1 = toy_grads(params, 0), toy_grads(params, 1)
    u0, state = ms_update(g0, state, params)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u0))
    u1, state = ms_update(g1, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
    ref, _ = update(mean, tx.init(params), params)
    assert_close(u1, ref)


@pytest.mark.parametrize("name", NAMES)
def test_dtypes_kept(name):
    params = toy_params(jnp.bfloat16)
    tx = make(name)
    state0 = tx.init(params)
    u, state1 = jax.jit(tx.update)(toy_grads(params, 0), state0, params)
    u, state2 = jax.jit(tx.update)(toy_grads(params, 1), state1, params)
    assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(lambda x: x.dtype, params)
    dt = lambda s: jax.tree.map(lambda x: jnp.asarray(x).dtype, s)
    assert dt(state0) == dt(state2)
    assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree.leaves(u))


@pytest.mark.parametrize("name", NAMES)
def test_sharding_kept(name):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    specs = {"w": P("data", "model"), "stack": P(None, "data", "model"), "b": P("model")}
    psh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    params = jax.device_put(toy_params(), psh)
    tx = make(name)
    osh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        jax.eval_shape(tx.init, params),
        psh,
        transform_non_params=lambda _: NamedSharding(mesh, P()),
    )
    state0 = jax.jit(tx.init, out_shardings=osh)(params)
    grads = jax.device_put(toy_grads(params, 0), psh)
    u, state1 = jax.jit(tx.update)(grads, state0, params)
    for a, b in zip(jax.tree.leaves(state0), jax.tree.leaves(state1)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
    # Param-shaped state leaves follow their parameter (the momentum is not replicated).
    mu = jax.tree.leaves(state0)
    if name not in NO_PARAM_STATE:
        assert any(x.shape == (2, 8, 16) and x.sharding.spec == P(None, "data", "model") for x in mu)
    for k in specs:
        assert u[k].sharding.is_equivalent_to(psh[k], u[k].ndim)
    # Same numbers as an unsharded run (float32 rounding, amplified by M3's 1/sqrt(V)).
    u_ref, _ = cached(name)[1](toy_grads(toy_params(), 0), tx.init(toy_params()), toy_params())
    assert_close(u, u_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_orbax_round_trip(name, tmp_path):
    params = toy_params()
    tx, update = cached(name)
    _, state, _ = run(tx, params, 2, update=update)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "state", state)
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state, restored)
    # The restored state continues exactly like the original.
    g = toy_grads(params, 5)
    assert_close(update(g, state, params)[0], update(g, restored, params)[0], 0, 0)


@pytest.mark.parametrize("name", NAMES)
def test_converges_least_squares(name):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    w_star = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
    y = x @ w_star + 0.5

    def loss_fn(p):
        return jnp.mean(jnp.square(x @ p["w"] + p["b"] - y))

    params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros((4,))}
    lr, ratio = CONVERGENCE[name]
    tx = make(name, lr)

    @jax.jit
    def steps(params, state):
        def body(carry, _):
            p, s = carry
            g = jax.grad(loss_fn)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, state), None, length=300)[0]

    init_loss = loss_fn(params)
    params, _ = steps(params, tx.init(params))
    final = loss_fn(params)
    assert final < ratio * init_loss, (float(init_loss), float(final))
