"""RWKV-7: the generalised delta rule through the memory core, token shift, value residual and the
channel mix (shared checks in tests/models/linear_model_checks.py).

The reference initialisation zeroes W_o, the channel mix's W_2 and the LoRA down-projections, so that
at init every block is the identity and logits depend on the current token alone: the equivalence
checks run on the initial parameters plus noise, where every path matters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import configs
from nl_jax.mixers.rwkv7 import LOG_DECAY_SCALE
from nl_jax.models import build_model, count_params
from tests.memory.inputs import max_tree_rel_err, rel_err
from tests.models import linear_model_checks as checks
from tests.models.test_document_boundaries import assert_packed_equals_apart

NAME = "rwkv7"


@pytest.fixture(scope="module")
def bench():
    bench = checks.Bench(NAME)
    bench.init_params = bench.params
    noise = jax.random.split(jax.random.key(bench.seed + 7), len(jax.tree.leaves(bench.params)))
    leaves, treedef = jax.tree.flatten(bench.params)
    noisy = [p + 0.05 * jax.random.normal(key, p.shape, p.dtype) for p, key in zip(leaves, noise)]
    bench.params = jax.tree.unflatten(treedef, noisy)
    nnx.update(bench.model, bench.params)
    return bench


def test_causality_and_decode_equals_chunked_forward(bench, length=20):
    """Causal; decode steps (memory_recurrent) == the chunked prefill (which pads the last chunk);
    two prefills of 7 and 13 tokens == one: logits and final states."""
    model, seed, vocab = bench.model, bench.seed, bench.cfg.vocab_size
    tokens = bench.inputs[:2, :length]
    full, chunked_state = bench.prefill(tokens, model.init_decode_state(2))
    assert full.shape == (2, length, vocab) and full.dtype == jnp.float32
    changed, _ = bench.prefill(tokens.at[:, 11].set((tokens[:, 11] + 1) % vocab), model.init_decode_state(2))
    np.testing.assert_array_equal(full[:, :11], changed[:, :11], err_msg=f"seed {seed}")
    assert np.all(np.abs(np.asarray(full[:, 11:] - changed[:, 11:])).max(axis=-1) > 0), seed

    state, logits = model.init_decode_state(2), []
    for i in range(length):
        out, state = bench.step(tokens[:, i], state)
        logits.append(out)
    assert rel_err(jnp.stack(logits, 1), full) < 1e-5, seed
    assert max_tree_rel_err(chunked_state, state) < 1e-5, seed
    assert float(jnp.linalg.norm(state.attn.memory)) > 1e-2, seed  # the state is not trivially zero

    first, mid = bench.prefill(tokens[:, :7], model.init_decode_state(2))
    second, end = bench.prefill(tokens[:, 7:], mid)
    assert rel_err(jnp.concatenate([first, second], 1), full) < 1e-5, seed
    assert max_tree_rel_err(end, chunked_state) < 1e-5, seed


def test_chunked_equals_naive_loss_and_grads(bench):
    checks.check_chunked_equals_naive(bench)


# ---- the layer written out in float64 numpy from its parameters ----


def _np(p):
    return np.asarray(p[...], np.float64)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _lora(lora, x, act=None):
    h = x @ _np(lora.down.kernel)
    y = np.einsum("btr,rhn->bthn", h if act is None else act(h), _np(lora.up.kernel))
    return y if lora.bias is None else y + _np(lora.bias)


def reference_time_mix(mixer, x, v_first):
    """RWKV-7's time mix token by token (the reference's x070 recurrence, not the memory core):
    x [B, T, D], v_first [B, T, H, N] float64 -> y [B, T, D]."""
    b, t, d = x.shape
    h, n = mixer.s.num_heads, mixer.s.head_dim
    prev = np.concatenate([np.zeros((b, 1, d)), x[:, :-1]], axis=1)
    xs = {c: x + (prev - x) * _np(getattr(mixer, f"mu_{c}")) for c in "rwkvag"}
    proj = lambda lin, z: np.einsum("btd,dhn->bthn", z, _np(lin.kernel))  # noqa: E731
    r, k, v = proj(mixer.r_proj, xs["r"]), proj(mixer.k_proj, xs["k"]), proj(mixer.v_proj, xs["v"])
    w = np.exp(-np.exp(-0.5) * _sigmoid(_lora(mixer.w_lora, xs["w"], np.tanh)))
    v = v + (v_first - v) * _sigmoid(_lora(mixer.v_lora, xs["v"]))
    a = _sigmoid(_lora(mixer.a_lora, xs["a"]))
    g = _lora(mixer.g_lora, xs["g"], _sigmoid)
    kk = k * _np(mixer.k_k)
    kk = kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)
    k = k * (1 + (a - 1) * _np(mixer.k_a))
    o = np.zeros((b, t, h, n))
    for bi in range(b):
        for hi in range(h):
            S = np.zeros((n, n))
            for ti in range(t):
                at = lambda z: z[bi, ti, hi]  # noqa: E731
                S = S @ (np.diag(at(w)) - np.outer(at(kk), at(kk) * at(a))) + np.outer(at(v), at(k))
                o[bi, ti, hi] = S @ at(r)
    mean = o.mean(-1, keepdims=True)
    var = ((o - mean) ** 2).mean(-1, keepdims=True)
    o = (o - mean) / np.sqrt(var + mixer.o_norm.eps) * _np(mixer.o_norm.scale) + _np(mixer.o_norm.bias)
    o = (o + np.sum(r * k * _np(mixer.r_k), -1, keepdims=True) * v) * g
    return np.einsum("bthn,hnd->btd", o, _np(mixer.o_proj.kernel))


def test_time_mix_is_the_reference_recurrence(bench):
    """One layer's chunked forward == the recurrence written out from its parameters (float64), with a
    value residual from another layer (layer 0 itself has v_first = v)."""
    graphdef, state = nnx.split(bench.model.blocks.layers.attn)
    mixer = nnx.merge(graphdef, jax.tree.map(lambda p: p[1], state))
    ks = jax.random.split(jax.random.key(bench.seed + 1))
    x = jax.random.normal(ks[0], (2, 12, bench.cfg.d_model))
    v_first = jax.random.normal(ks[1], (2, 12, mixer.s.num_heads, mixer.s.head_dim))
    y, v_out, _ = checks.jit(lambda x, v: mixer(x, v, jnp.asarray(False)))(x, v_first)
    want = reference_time_mix(mixer, np.asarray(x, np.float64), np.asarray(v_first, np.float64))
    assert rel_err(y, jnp.asarray(want, jnp.float32)) < 1e-5, bench.seed
    np.testing.assert_array_equal(v_out, v_first)
    _, v_own, _ = checks.jit(lambda x, v: mixer(x, v, jnp.asarray(True)))(x, v_first)
    assert rel_err(v_own, v_first) > 0.5  # layer 0 hands on its own values


def test_initialisation_follows_the_reference(bench):
    """Decays start within (exp(-e^-1/2), 1) with the per-channel spread of w0; blocks start as the
    identity (zero W_o and W_2); the group norm's scale grows with depth as ((i + 1) / L)^0.7."""
    model = build_model(configs.load("rwkv7_tiny").model, nnx.Rngs(bench.seed))
    attn = model.blocks.layers.attn
    decay = np.exp(-LOG_DECAY_SCALE * _sigmoid(_np(attn.w_lora.bias)))
    assert np.all((decay > np.exp(-np.exp(-0.5))) & (decay < 1)) and decay.max() > 0.99 > 0.6 > decay.min()
    assert not np.any(_np(attn.o_proj.kernel)) and not np.any(_np(model.blocks.layers.mlp.value.kernel))
    scales = _np(attn.o_norm.scale)[:, 0, 0]
    np.testing.assert_allclose(scales, ((np.arange(4) + 1) / 4) ** 0.7, rtol=1e-6)
    w = _np(attn.r_proj.kernel)[0].reshape(128, 128)
    np.testing.assert_allclose(w.T @ w, np.eye(128), atol=1e-5)  # orthogonal
    tokens = jnp.arange(12)[None] % 7
    np.testing.assert_allclose(model(tokens)[0, 7], model(tokens)[0, 0], atol=1e-5)  # the token alone


def test_tiny_config_overfits(bench):
    """From the reference initialisation (the noisy parameters are for the equivalence checks)."""
    params = bench.params
    bench.params = bench.init_params
    try:
        checks.check_overfits(bench)
    finally:
        bench.params = params


def test_bfloat16_compute_keeps_float32_params_logits_and_state(bench):
    model = build_model(checks.bench_cfg(NAME, dtype="bfloat16"), nnx.Rngs(bench.seed))
    nnx.update(model, bench.params)
    assert model.blocks.layers.attn.r_proj.kernel[...].dtype == jnp.float32
    logits = checks.jit(lambda t: model(t))(bench.inputs)
    assert logits.dtype == jnp.float32
    ref = checks.jit(lambda t: bench.model(t))(bench.inputs)
    # bf16 rounding (2^-8) through two noisy layers: a few logits move by ~0.06, the whole by ~1%
    assert rel_err(logits, ref) < 3e-2, bench.seed
    assert model.init_decode_state(1).attn.memory.dtype == jnp.float32


def test_forward_flops_per_token_matches_xla():
    """As for the other linear models, at chunks of 64 (the channel-weighted C x C products grow as
    C^2 N, and the decay products as C^3 N, so this also checks their terms)."""
    checks.check_flops(NAME)


def test_reset_packed_equals_apart(bench):
    """With segment ids each document of a packed row gives the logits it gives alone: the chunked
    form (boundaries inside chunks) restarts the state and both token shifts."""
    forward = checks.jit(lambda t, s: bench.model(t, segment_ids=s) if s is not None else bench.model(t))
    assert_packed_equals_apart(forward, bench.seed, bench.cfg.vocab_size)


# Exact parameter counts of the named configs (the README table; update both if a shape changes).
EXACT = {
    "rwkv7_tiny": 1_011_328,
    "rwkv7_340m": 349_430_784,
    "rwkv7_760m": 762_435_072,
    "rwkv7_1_3b": 1_324_861_440,
}


@pytest.mark.parametrize("config_name", sorted(EXACT))
def test_config_parameter_counts(config_name):
    assert count_params(configs.load(config_name).model) == EXACT[config_name]
