"""Schedules (warm-up, cosine, WSD) and the optimizer factory (nl_jax.optim.schedules / factory)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import base
from nl_jax.optim import schedules
from nl_jax.optim.factory import OPTIMIZERS, decay_mask, make_optimizer, matrix_dims
from nl_jax.optim.matrix import MatrixDims


def _lrs(schedule, n):
    return np.array([float(schedule(i)) for i in range(n)])


def test_warmup_cosine_shape():
    lr = _lrs(schedules.warmup_cosine(1.0, 10, 110, final_fraction=0.1), 111)
    np.testing.assert_allclose(lr[:10], np.linspace(0.1, 1.0, 10), rtol=1e-6)  # first step already moves
    assert lr[10] == pytest.approx(1.0)
    assert np.all(np.diff(lr[10:]) <= 1e-7)
    assert lr[60] == pytest.approx(0.55, rel=1e-5)  # half-way down the cosine: (1 + 0.1) / 2
    assert lr[110] == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_is_flat_then_decays_over_the_last_fraction(shape):
    lr = _lrs(schedules.wsd(2.0, 5, 100, decay_fraction=0.2, final_fraction=0.0, decay_shape=shape), 101)
    assert lr[4] == pytest.approx(2.0)
    np.testing.assert_allclose(lr[5:80], 2.0)
    assert np.all(np.diff(lr[80:]) < 0)
    assert lr[100] == pytest.approx(0.0, abs=1e-6)
    if shape == "linear":
        assert lr[90] == pytest.approx(1.0, rel=1e-5)


def test_schedule_errors_and_short_runs():
    cfg = base.optim_config()
    cfg.schedule = "triangle"
    with pytest.raises(ValueError, match="unknown optim.schedule 'triangle'"):
        schedules.from_config(cfg, 100)
    cfg.schedule, cfg.warmup_steps = "cosine", 500  # longer than the run: warm up over all of it
    assert float(schedules.from_config(cfg, 20)(19)) == pytest.approx(cfg.lr)


def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "w": jax.random.normal(k[0], (3, 8, 4)),  # a stacked (layers, embed, mlp) matrix
        "scale": jnp.ones((3, 8)),  # a stacked norm scale
        "o": jax.random.normal(k[1], (4, 2, 8)),  # (heads, head_dim, embed): an output projection
    }


NAMES = {"w": ("layers", "embed", "mlp"), "scale": ("layers", "norm"), "o": ("heads", "head_dim", "embed")}


def test_decay_mask_and_matrix_dims_from_logical_names():
    assert decay_mask(_params(), NAMES) == {"w": True, "scale": False, "o": True}
    dims = matrix_dims(NAMES)
    assert dims["w"] == MatrixDims(1, (2,)) and dims["scale"] is None
    assert dims["o"] == MatrixDims((0, 1), 2)


def test_adamw_equals_optax_adamw_with_the_same_mask():
    cfg = base.optim_config()
    cfg.update(schedule="constant", warmup_steps=0, lr=1e-2, clip_norm=0.0, weight_decay=0.1)
    tx, _ = make_optimizer(cfg, 10, NAMES)
    ref = optax.adamw(
        1e-2, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.1, mask=decay_mask(_params(), NAMES)
    )
    p1 = p2 = _params()
    s1, s2 = tx.init(p1), ref.init(p2)
    for i in range(3):
        g = jax.tree.map(lambda x: jnp.sin(x * (i + 1)), p1)
        u1, s1 = tx.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p1, p2)


def test_trainable_freezes_what_the_pattern_does_not_match():
    """optim.trainable="^w": "w" trains exactly as AdamW alone would (decay included), "scale" and
    "o" get zero updates and hold no optimizer state."""
    cfg = base.optim_config()
    cfg.update(schedule="constant", warmup_steps=0, lr=1e-2, clip_norm=0.0, weight_decay=0.1)
    full, _ = make_optimizer(cfg, 10, NAMES)
    cfg.trainable = "^w"
    tx, _ = make_optimizer(cfg, 10, NAMES)
    p = _params()
    state, ref_state = tx.init(p), full.init(p)
    assert sum(x.size for x in jax.tree.leaves(state)) < sum(x.size for x in jax.tree.leaves(ref_state))
    for i in range(2):
        g = jax.tree.map(lambda x: jnp.sin(x * (i + 1)), p)
        u, state = tx.update(g, state, p)
        u_ref, ref_state = full.update(g, ref_state, p)
        assert float(jnp.abs(u["scale"]).max()) == 0.0 and float(jnp.abs(u["o"]).max()) == 0.0
        np.testing.assert_allclose(u["w"], u_ref["w"], rtol=1e-6, atol=1e-8)  # op order may differ, not the math
    with pytest.raises(ValueError, match=r"optim.trainable='/cms/' matches no parameter path \(they look like 'o'\)"):
        cfg.trainable = "/cms/"
        make_optimizer(cfg, 10, NAMES)


def test_clipping_bounds_the_update():
    cfg = base.optim_config()
    cfg.update(
        name="momentum_memory", schedule="constant", warmup_steps=0, lr=1.0, clip_norm=0.5, weight_decay=0.0
    )
    tx, _ = make_optimizer(cfg, 10)
    p = _params()
    u, _ = tx.update(jax.tree.map(lambda x: 100 * jnp.ones_like(x), p), tx.init(p), p)
    assert float(optax.global_norm(u)) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_by_name_reduces_a_quadratic(name):
    cfg = base.optim_config()
    cfg.update(name=name, schedule="cosine", warmup_steps=2, lr=0.02, weight_decay=0.0)
    if name == "m3":
        cfg.kwargs = ml_collections.ConfigDict(dict(period=5))
    tx, _ = make_optimizer(cfg, 30, NAMES)
    p = _params()
    loss = lambda q: sum(jnp.sum(x**2) for x in jax.tree.leaves(q))
    s = tx.init(p)
    start = float(loss(p))
    step = jax.jit(
        lambda p, s: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(
            tx.update(jax.grad(loss)(p), s, p)
        )
    )
    for _ in range(30):
        p, s = step(p, s)
    assert float(loss(p)) < start, name


def test_unknown_optimizer_and_kwargs():
    cfg = base.optim_config()
    cfg.name = "muonn"
    with pytest.raises(ValueError, match=r"unknown optim.name 'muonn'.*Did you mean muon"):
        make_optimizer(cfg, 10)
    cfg.name, cfg.kwargs = "m3", ml_collections.ConfigDict(dict(perod=3))
    with pytest.raises(ValueError, match=r"optim.kwargs \['perod'\] are not arguments of m3"):
        make_optimizer(cfg, 10)
