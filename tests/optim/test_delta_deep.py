"""Delta momentum (Eq. 48-49) and deep momentum / DMGD (Eq. 50) against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax import optim

SHAPES = {"w": (6, 4), "stack": (2, 3, 5), "b": (5,), "s": ()}


def draws(seed, n):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)]


def run_transform(tx, grads):
    params = jax.tree.map(jnp.zeros_like, grads[0])
    update = jax.jit(tx.update)
    state = tx.init(params)
    init_state = state
    outs = []
    for g in grads:
        u, state = update(g, state, params)
        outs.append(u)
    return outs, init_state


def delta_reference(gs, alpha, beta):
    """M <- (alpha I - beta G G^T / ||G||^2) M + G on (n_in, n_out) matrices; vectors as columns."""
    m = np.zeros_like(gs[0])
    out = []
    for g in gs:
        mats_g = g.reshape(-1, g.shape[-2], g.shape[-1]) if g.ndim >= 2 else g.reshape(1, -1, 1)
        mats_m = m.reshape(mats_g.shape)
        new = []
        for gi, mi in zip(mats_g, mats_m):
            gram = gi @ gi.T / np.sum(gi * gi)
            new.append((alpha * np.eye(gi.shape[0]) - beta * gram) @ mi + gi)
        m = np.stack(new).reshape(g.shape)
        out.append(m)
    return out


def test_delta_momentum_matches_reference():
    grads = draws(0, 4)
    outs, _ = run_transform(optim.scale_by_delta_momentum(decay=0.9, beta=0.6), grads)
    for k in SHAPES:
        ref = delta_reference([g[k] for g in grads], 0.9, 0.6)
        for o, r in zip(outs, ref):
            np.testing.assert_allclose(o[k], r, rtol=1e-5, atol=1e-6)


def test_delta_momentum_stops_along_a_repeated_gradient():
    """Constant g: plain momentum -> g/(1-alpha); delta momentum -> g/(1-alpha+beta)."""
    g = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((5, 3)), jnp.float32)}
    tx = optim.scale_by_delta_momentum(decay=0.9, beta=0.5)
    state = tx.init(g)
    step = jax.jit(lambda s: tx.update(g, s)[1])
    for _ in range(200):
        state = step(state)
    # g is rank <= 3 and m stays in its column space, where G G^T/||G||^2 is not the identity:
    # check the fixed point m = (alpha I - beta P) m + g directly.
    gi = np.asarray(g["w"])
    fixed = np.linalg.solve(np.eye(5) * 0.1 + 0.5 * gi @ gi.T / np.sum(gi * gi), gi)
    np.testing.assert_allclose(state.mu["w"], fixed, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(fixed) < np.linalg.norm(gi / 0.1)


def deep_reference(gs, a0, b0, decay, inner_lr, mlp_lr, objective):
    """U = M + tanh(A) B / sqrt(n_in); one inner step on -<U, G> (dot) or 1/2||U - G||^2 (l2)."""
    m, a, b = np.zeros_like(gs[0]), a0.copy(), b0.copy()
    sq = np.sqrt(np.float32(a.shape[0]))
    out = []
    for g in gs:
        u_old = m + np.tanh(a) @ b / sq
        s = g if objective == "dot" else g - u_old
        ga = (1 - np.tanh(a) ** 2) * (s @ b.T) / sq
        gb = np.tanh(a).T @ s / sq
        m, a, b = decay * m + inner_lr * s, decay * a + mlp_lr * ga, decay * b + mlp_lr * gb
        out.append(m + np.tanh(a) @ b / sq)
    return out


@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_deep_momentum_matches_reference(objective):
    grads = draws(2, 4)
    tx = optim.scale_by_deep_momentum(
        decay=0.8, inner_lr=0.7, mlp_lr=0.5, memory=optim.MomentumMLP(hidden=3), objective=objective
    )
    outs, state0 = run_transform(tx, grads)
    # w: one (6, 4) matrix with A: (6, 3), B: (3, 4); stack: per layer.
    assert state0.w_in["w"].shape == (6, 3) and state0.w_out["w"].shape == (3, 4)
    assert state0.w_in["stack"].shape == (2, 3, 3) and state0.w_out["stack"].shape == (2, 3, 5)
    for k in ("w", "stack"):
        a0 = np.asarray(state0.w_in[k]).reshape((-1,) + state0.w_in[k].shape[-2:])
        b0 = np.asarray(state0.w_out[k]).reshape((-1,) + state0.w_out[k].shape[-2:])
        gs = [g[k].reshape((-1,) + g[k].shape[-2:]) for g in grads]
        for layer in range(a0.shape[0]):
            ref = deep_reference([g[layer] for g in gs], a0[layer], b0[layer], 0.8, 0.7, 0.5, objective)
            for o, r in zip(outs, ref):
                np.testing.assert_allclose(
                    np.asarray(o[k]).reshape(gs[0].shape)[layer], r, rtol=1e-5, atol=1e-6
                )
    # vectors / scalars: linear memory (momentum with inner_lr), no MLP.
    m = np.zeros(5, np.float32)
    for o, g in zip(outs, grads):
        m = 0.8 * m + 0.7 * (g["b"] if objective == "dot" else g["b"] - m)
        np.testing.assert_allclose(o["b"], m, rtol=1e-6)


def test_deep_momentum_custom_dims_and_state_sizes():
    params = {"w": jnp.zeros((3, 10, 2))}  # (in, batch, out)
    tx = optim.deep_momentum(0.1, memory=optim.MomentumMLP(hidden=4), dims={"w": optim.MatrixDims(0, 2)})
    state = tx.init(params)
    inner = state[0]
    assert inner.w_in["w"].shape == (3, 10, 4) and inner.w_out["w"].shape == (4, 10, 2)
    g = {"w": jnp.asarray(np.random.default_rng(3).standard_normal((3, 10, 2)), jnp.float32)}
    u, state = tx.update(g, state)
    assert u["w"].shape == (3, 10, 2) and bool(jnp.all(jnp.isfinite(u["w"])))
    assert jax.tree.map(jnp.shape, state) == jax.tree.map(jnp.shape, tx.init(params))
    # the MLP part is per batch element: zeroing one batch slice of g only changes that slice of B
    g2 = {"w": g["w"].at[:, 4, :].set(0.0)}
    _, s2 = tx.update(g2, tx.init(params))
    changed = np.any(np.asarray(s2[0].w_out["w"]) != np.asarray(state[0].w_out["w"]), axis=(0, 2))
    assert changed.tolist() == [i == 4 for i in range(10)]


def delta_literal_reference(gs, alpha, beta):
    """Eq. 49 in the paper's layout (m, g: d_out x d_in): m <- m (alpha I - beta g^T g) + g.

    Our leaves are (n_in, n_out) = the paper's transpose, so g_paper = G^T; vectors are n x 1 columns.
    """
    m = np.zeros_like(gs[0])
    out = []
    for g in gs:
        mats = g.reshape(-1, g.shape[-2], g.shape[-1]) if g.ndim >= 2 else g.reshape(1, -1, 1)
        ms = m.reshape(mats.shape)
        new = []
        for gi, mi in zip(mats, ms):
            gp, mp = gi.T, mi.T  # paper layout
            mp = mp @ (alpha * np.eye(gp.shape[1]) - beta * gp.T @ gp) + gp
            new.append(mp.T)
        m = np.stack(new).reshape(g.shape)
        out.append(m)
    return out


def test_delta_momentum_literal_is_eq49():
    # Gradients scaled so that the raw Gram is a contraction and ||G||_F != 1 (where the forms differ).
    grads = [jax.tree.map(lambda x: 0.3 * x, g) for g in draws(4, 4)]
    outs, _ = run_transform(optim.scale_by_delta_momentum(decay=0.9, beta=1.0, form="literal"), grads)
    normalized, _ = run_transform(optim.scale_by_delta_momentum(decay=0.9, beta=1.0), grads)
    for k in SHAPES:
        ref = delta_literal_reference([g[k] for g in grads], 0.9, 1.0)
        for o, r in zip(outs, ref):
            np.testing.assert_allclose(o[k], r, rtol=1e-5, atol=1e-6)
    # The normalised projector is a different rule here (it would fail the reference above).
    assert not np.allclose(np.asarray(outs[-1]["w"]), np.asarray(normalized[-1]["w"]), atol=1e-3)


def test_delta_momentum_forms_agree_for_unit_norm_gradients():
    grads = draws(5, 3)
    unit = [jax.tree.map(lambda x: x / np.sqrt(np.sum(x * x)), g) for g in grads]
    lit, _ = run_transform(optim.scale_by_delta_momentum(decay=0.9, beta=0.7, form="literal"), unit)
    nrm, _ = run_transform(optim.scale_by_delta_momentum(decay=0.9, beta=0.7), unit)
    for a, b in zip(lit, nrm):
        for k in ("w", "b", "s"):  # not "stack": its layers are not unit-norm one by one
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def gradient_key_reference(gs, a0, b0, decay, inner_lr, mlp_lr, objective):
    """Eq. 50 with the gradient as key: f(Z) = Z M + tanh(Z A) B / sqrt(n_in), Z = G^T, value I.

    One inner GD step on -tr f(Z) (dot) or 1/2 ||f(Z) - I||^2 (l2), hand-derived gradients; the update
    is f at the identity keys, M + tanh(A) B / sqrt(n_in).
    """
    m, a, b = np.zeros_like(gs[0]), a0.copy(), b0.copy()
    sq = np.sqrt(np.float32(a.shape[0]))
    out = []
    for g in gs:
        z = g.T
        h = np.tanh(z @ a)
        f = z @ m + h @ b / sq
        s = np.eye(g.shape[1]) if objective == "dot" else np.eye(g.shape[1]) - f
        gm = z.T @ s
        gb = h.T @ s / sq
        ga = z.T @ ((s @ b.T / sq) * (1 - h**2))
        m, a, b = decay * m + inner_lr * gm, decay * a + mlp_lr * ga, decay * b + mlp_lr * gb
        out.append(m + np.tanh(a) @ b / sq)
    return out


@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_deep_momentum_gradient_key_matches_reference(objective):
    grads = [jax.tree.map(lambda x: 0.5 * x, g) for g in draws(6, 4)]
    kw = dict(decay=0.8, inner_lr=0.7, mlp_lr=0.5, memory=optim.MomentumMLP(hidden=3), objective=objective)
    outs, state0 = run_transform(optim.scale_by_deep_momentum(key="gradient", **kw), grads)
    coordinate, _ = run_transform(optim.scale_by_deep_momentum(**kw), grads)
    for k in ("w", "stack"):
        a0 = np.asarray(state0.w_in[k]).reshape((-1,) + state0.w_in[k].shape[-2:])
        b0 = np.asarray(state0.w_out[k]).reshape((-1,) + state0.w_out[k].shape[-2:])
        gs = [g[k].reshape((-1,) + g[k].shape[-2:]) for g in grads]
        for layer in range(a0.shape[0]):
            layer_grads = [g[layer] for g in gs]
            ref = gradient_key_reference(layer_grads, a0[layer], b0[layer], 0.8, 0.7, 0.5, objective)
            for o, r in zip(outs, ref):
                got = np.asarray(o[k]).reshape(gs[0].shape)[layer]
                np.testing.assert_allclose(got, r, rtol=1e-4, atol=1e-5)
    # The one-hot-key reading is another memory: it would fail the reference above.
    assert not np.allclose(np.asarray(outs[-1]["w"]), np.asarray(coordinate[-1]["w"]), atol=1e-3)
    # vectors / scalars: linear memory on the n x 1 column, key g^T, value 1.
    m = np.zeros(5, np.float32)
    for o, g in zip(outs, grads):
        s = 1.0 if objective == "dot" else 1.0 - np.dot(g["b"], m)
        m = 0.8 * m + 0.7 * g["b"] * s
        np.testing.assert_allclose(o["b"], m, rtol=1e-5, atol=1e-6)


def test_gradient_keyed_linear_l2_memory_is_literal_delta_momentum():
    """Linear memory, l2 objective, gradient keys: M <- decay M - G (G^T M - I) = Eq. 49 (beta=1)."""
    grads = [jax.tree.map(lambda x: 0.3 * x, g) for g in draws(7, 4)]
    deep, _ = run_transform(
        optim.scale_by_deep_momentum(decay=0.9, memory=None, objective="l2", key="gradient"), grads
    )
    delta, _ = run_transform(optim.scale_by_delta_momentum(decay=0.9, beta=1.0, form="literal"), grads)
    for a, b in zip(deep, delta):
        for k in SHAPES:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
