"""The switches between nl_jax's stabilised self-modifying update and the paper's literal form
(docs/design.md, Decision 11): raw values (`normalize_values=False`), an unbounded inner learning
rate (`eta_param="paper"`), one input read by every memory (`memory_inputs="shared"`), and
`paper_literal`, which sets all three and turns inner gradient clipping off; each against the
token-by-token reference, and the switch reaching a hope_tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import configs
from nl_jax.memory.ops import structures
from nl_jax.mixers.self_modifying import (
    ETA_PARAMS,
    MEMORY_INPUTS,
    SelfModifyingTitans,
    eta_rate,
    input_projections,
)
from nl_jax.mixers.self_modifying_reference import reference_forward
from nl_jax.models import build_model
from tests.memory.inputs import fresh_seed, max_grad_err, max_tree_rel_err, rel_err
from tests.mixers.test_self_modifying import MAX_LR, TOL, D, _call, _layer, _like, _params, _value_and_grads, _x


def _rates_and_values(layer, x):
    """q, k, v and the rates `generate` gives for x from the initial memories: [B, H, T, ...]."""
    state = layer.init_state(x.shape[0])
    z, beta, _ = layer.paths(x, state.conv)
    blocks = jax.tree.map(lambda a: jnp.swapaxes(a, 1, 2), (z, beta))
    return layer.generate(state.memories.boundary, *blocks)


def _clip_margin(layer, x, monkeypatch):
    """How far every token's inner gradient norm sits from the clip bound, min | |g|^2 / c^2 - 1 |, in
    the reference run. The clip's derivative jumps at the bound: a token within rounding of it (seed
    1460154424: |g|^2 = 1 - 3e-7) is clipped in one form and not in the other, and the two forms'
    gradients then differ by 1% in a small leaf."""
    seen = []
    grad_scale = structures.grad_scale

    def recording(spec, norm_sq):
        rel = lambda n: seen.append(float(np.abs(np.asarray(n) / spec.max_grad_norm**2 - 1).min()))  # noqa: E731
        jax.debug.callback(rel, norm_sq)
        return grad_scale(spec, norm_sq)

    with monkeypatch.context() as m:
        m.setattr(structures, "grad_scale", recording)
        jax.clear_caches()  # trace the reference anew, through the recording function
        jax.block_until_ready(reference_forward(layer, x))
        jax.effects_barrier()
    jax.clear_caches()
    return min(seen)


def _chunked_equals_reference(layer, x, seed):
    cot = jax.random.normal(jax.random.key(seed + 5), x.shape)
    y, _, g = _value_and_grads(lambda m, x: m(x), layer, x, cot)
    y_ref, state_ref, g_ref = _value_and_grads(reference_forward, layer, x, cot)
    assert rel_err(y, y_ref) < TOL, seed
    assert max_grad_err(g, g_ref) < TOL and max_tree_rel_err(g, g_ref) < 1e-3, seed
    _, state = _call(layer, x, layer.init_state(x.shape[0]))
    # A momentum leaf that sums gradients of opposite signs is small by cancellation and carries the
    # two forms' rounding at up to 8e-6 of its norm (normalised values, 600 draws).
    assert max_tree_rel_err(state, state_ref) < 5 * TOL, seed
    return y


def test_normalised_values_change_the_output_and_keep_chunked_equal_to_the_reference():
    seed = fresh_seed()
    base = _layer(seed, chunk_size=2, memory_chunk_size=8, read="per_token", normalize_values=True)
    raw = _like(base, read="per_token", normalize_values=False)
    assert raw.normalize_values is False and base.normalize_values is True
    x = _x(seed, 16)
    _, _, v_raw, _ = _rates_and_values(raw, x)
    _, _, v_unit, _ = _rates_and_values(base, x)
    norms = jnp.linalg.norm(v_raw, axis=-1)
    assert float(jnp.abs(norms - 1).max()) > 1e-2, seed  # raw v is not unit
    assert rel_err(v_unit, v_raw / jnp.sqrt(norms[..., None] ** 2 + 1e-6)) < 1e-5, seed
    y_raw = _chunked_equals_reference(raw, x, seed)
    y_unit = _chunked_equals_reference(base, x, seed)
    assert rel_err(y_raw, y_unit) > 1e-4, seed


def test_eta_rate_forms():
    logits = jnp.array([-30.0, -1.0, 0.0, 2.0, 10.0, 100.0])
    bounded = eta_rate(logits, "bounded", 0.5)
    paper = eta_rate(logits, "paper", 0.5)
    assert float(bounded.max()) <= 0.5 and float(bounded.min()) >= 0
    assert jnp.allclose(bounded, 0.5 * jax.nn.sigmoid(logits))
    assert float(paper[3]) == pytest.approx(2.126928, rel=1e-5)  # log(1 + e^2)
    assert float(paper[2]) == pytest.approx(0.693147, rel=1e-5)  # log 2, the rate at eta's initial bias
    assert bool(jnp.all(paper > 0)) and float(paper[-1]) == pytest.approx(100.0)  # unbounded above
    with pytest.raises(ValueError, match=r"eta_param must be one of \('bounded', 'paper'\)"):
        eta_rate(logits, "clipped", 0.3)


def test_paper_eta_exceeds_one_where_bounded_stays_below_max_lr():
    seed = fresh_seed()
    bounded = _layer(seed, chunk_size=2, memory_chunk_size=8)
    paper = _like(bounded, eta_param="paper")
    x = _x(seed, 16)
    for layer in (bounded, paper):  # a large read-out: eta's bias far up
        layer.eta_bias[...] = jnp.full(layer.eta_bias.shape, 5.0)
    eta_b = _rates_and_values(bounded, x)[3].lr
    eta_p = _rates_and_values(paper, x)[3].lr
    assert float(eta_b.max()) <= float(jnp.float32(bounded.max_lr)) and bounded.max_lr == MAX_LR, seed
    assert float(eta_p.min()) > 1.0, seed  # softplus(~5) ~ 5


def test_paper_eta_keeps_chunked_equal_to_the_reference():
    seed = fresh_seed()
    layer = _layer(seed, chunk_size=2, memory_chunk_size=8, eta_param="paper")
    # Rates of the bounded form's size: with eta near 1 the inner recurrence expands and float32
    # rounding differences between the two forms grow to 2e-3 of the state (12 seeds), which would
    # hide nothing but make the check meaningless.
    layer.eta_bias.value = layer.eta_bias.value - 3.0
    x = _x(seed, 16)
    eta = _rates_and_values(layer, x)[3].lr
    sig = layer.max_lr * jax.nn.sigmoid(jnp.log(jnp.expm1(eta)))  # the bounded rate of the same logit
    assert rel_err(eta, sig) > 1e-2, seed  # the form differs
    _chunked_equals_reference(layer, x, seed)


def test_shared_inputs_feed_every_memory_one_input_and_keep_chunked_equal_to_the_reference(monkeypatch):
    seed = fresh_seed()
    # With the inner clip (the default): one input feeding every memory, the unclipped memories of
    # these moved parameters can blow up within 16 tokens (seed 1641650940: inf, NaN gradients).
    # The bound moves off any token that sits on its kink, where the gradient has no single value.
    x = _x(seed, 16)
    bound = 1.0
    kw = lambda: dict(read="per_token", memory_inputs="shared", max_grad_norm=bound)  # noqa: E731
    shared = _layer(seed, chunk_size=2, memory_chunk_size=8, **kw())
    while _clip_margin(shared, x, monkeypatch) < 1e-4:
        bound *= 1.01
        shared = _layer(seed, chunk_size=2, memory_chunk_size=8, **kw())
    projected = _like(shared, read="per_token", memory_inputs="projected")
    names = set(_params(shared))
    assert {n for n in names if n[0].endswith("_proj") or n[0].endswith("_conv")} >= {("in_proj", "kernel")}
    assert not any(n[0] in ("q_proj", "k_proj", "v_proj", "eta_proj", "alpha_proj", "k_conv") for n in names)
    z, _, convs = shared.paths(x, shared.init_state(2).conv)
    assert len(convs) == 1 and set(z) == {"q", "k", "v", "eta", "alpha"}
    for name in ("k", "v", "eta", "alpha"):  # one input: a projected layer fails here
        assert float(jnp.abs(z[name] - z["q"]).max()) == 0.0, (seed, name)
    z_proj, _, _ = projected.paths(x, projected.init_state(2).conv)
    assert rel_err(z_proj["k"], z_proj["q"]) > 1e-2, seed
    # distinct initial memories: k and v differ although both are read from the same input
    _, k, v, _ = _rates_and_values(shared, x)
    assert rel_err(k, v) > 1e-2, seed
    y = _chunked_equals_reference(shared, x, seed)
    assert rel_err(y, _call(projected, x)[0]) > 1e-4, seed


def test_shared_inputs_stream_and_decode_like_one_call():
    seed = fresh_seed()
    layer = _layer(seed, chunk_size=2, memory_chunk_size=4, memory_inputs="shared")
    x = _x(seed, 8)
    y_full, _ = _call(layer, x)
    state, ys = layer.init_state(2), []
    for a, b in ((0, 3), (3, 4), (4, 5), (5, 8)):
        y, state = _call(layer, x[:, a:b], state)
        ys.append(y)
    assert rel_err(jnp.concatenate(ys, 1), y_full) < TOL, seed
    assert len(state.conv) == 1


def test_input_projections_count_what_the_layer_builds():
    for kw in (
        {},
        dict(weight_decay=False),
        dict(memory_inputs="shared"),
        dict(memory_inputs="shared", weight_decay=False),
        dict(paper_literal=True),
    ):
        layer = SelfModifyingTitans(D, 2, 4, rngs=nnx.Rngs(0), **kw)
        built = {p[0] for p in _params(layer) if p[0].endswith("_proj") and p[0] not in ("out_proj", "beta_proj")}
        assert len(built) == input_projections(**kw), (kw, built)
    assert MEMORY_INPUTS == ("projected", "shared")
    with pytest.raises(ValueError, match=r"memory_inputs must be one of \('projected', 'shared'\), got 'x'"):
        SelfModifyingTitans(D, 2, 4, rngs=nnx.Rngs(0), memory_inputs="x")


def test_paper_literal_sets_all_four_and_wins_over_explicit_values():
    default = SelfModifyingTitans(D, 2, 4, rngs=nnx.Rngs(0))
    assert (default.normalize_values, default.eta_param, default.max_grad_norm) == (False, "bounded", 1.0)
    assert default.memory_inputs == "shared"
    assert default.spec.max_grad_norm == default.out_spec.max_grad_norm == 1.0
    conflicting = dict(
        normalize_values=True, eta_param="bounded", max_grad_norm=1.0, max_lr=5.0, memory_inputs="projected"
    )
    for kw in ({}, conflicting):
        layer = SelfModifyingTitans(D, 2, 4, rngs=nnx.Rngs(0), paper_literal=True, **kw)
        assert layer.paper_literal is True
        assert layer.normalize_values is False and layer.eta_param == "paper", kw
        assert layer.memory_inputs == "shared", kw
        assert layer.max_grad_norm == layer.spec.max_grad_norm == layer.out_spec.max_grad_norm == 0.0, kw
    # with the paper's eta, max_lr is unused and not range-checked
    SelfModifyingTitans(D, 2, 4, rngs=nnx.Rngs(0), eta_param="paper", max_lr=5.0)
    with pytest.raises(ValueError, match=r"max_lr must be in \(0, 1\]"):
        SelfModifyingTitans(D, 2, 4, rngs=nnx.Rngs(0), max_lr=5.0)


def test_paper_literal_layer_equals_the_four_options_and_the_reference():
    seed = fresh_seed()
    literal = _layer(seed, chunk_size=2, memory_chunk_size=8, paper_literal=True)
    literal.eta_bias.value = literal.eta_bias.value - 3.0  # as in the test above
    by_hand = _like(literal, normalize_values=False, eta_param="paper", memory_inputs="shared")
    default = _like(literal)
    x = _x(seed, 16)
    y = _chunked_equals_reference(literal, x, seed)
    assert rel_err(_call(by_hand, x)[0], y) < 1e-6, seed
    assert rel_err(_call(default, x)[0], y) > 1e-4, seed


def test_unknown_eta_param_names_the_choices():
    assert ETA_PARAMS == ("bounded", "paper")
    with pytest.raises(ValueError, match=r"eta_param must be one of \('bounded', 'paper'\), got 'sigmoid'"):
        SelfModifyingTitans(D, 2, 4, rngs=nnx.Rngs(0), eta_param="sigmoid")


def _tiny(paper_literal):
    cfg = configs.load("hope_tiny").model
    cfg.update(vocab_size=32, d_model=32, num_layers=1, scan_layers=False)
    cfg.memory.update(num_heads=2, head_dim=8, chunk_size=2, memory_chunk_size=4)
    cfg.cms.update(periods=(4, 8), hidden=(16, 16))
    cfg.memory.paper_literal = paper_literal
    return cfg


def test_hope_tiny_with_paper_literal_runs_forward_and_gradient():
    """configs.load("hope_tiny") with model.memory.paper_literal=True (what the command-line flag
    --config.model.memory.paper_literal=True sets), shrunk: the flag reaches the layer, and the forward
    and the gradient are finite and differ from the default model's.

    8 tokens (two memory chunks, one period of the slowest level): over 16, the paper's unclipped
    inner loop with its unbounded eta diverges on about 1 random init in 100 (10 of 1,001 seeds; on
    the seed examined the per-token form's forward is NaN, the chunked form's forward finite and its
    gradient NaN); over 8, on 0 of 4,000.
    """
    assert configs.load("hope_tiny").model.memory.paper_literal is False
    seed = fresh_seed()
    tokens = jax.random.randint(jax.random.key(seed), (2, 8), 0, 32)

    def loss(model):
        logits = model(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    out = {}
    for flag in (True, False):
        model = build_model(_tiny(flag), nnx.Rngs(seed))
        mixers = [m for _, m in nnx.iter_graph(model) if isinstance(m, SelfModifyingTitans)]
        assert len(mixers) == 1
        layer = mixers[0]
        assert (layer.normalize_values, layer.eta_param, layer.max_grad_norm, layer.memory_inputs) == (
            (False, "paper", 0.0, "shared") if flag else (False, "bounded", 1.0, "shared")
        )
        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        leaves = jax.tree.leaves(grads)
        assert bool(jnp.isfinite(value)), seed
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), seed
        assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0, seed
        out[flag] = value
    assert abs(float(out[True]) - float(out[False])) > 1e-6, seed
