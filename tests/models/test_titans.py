"""Titans LMM / MAC / MAG / MAL: causality, decoding equals the full forward, the chunked memory equals
its token-by-token reference inside the whole model (outputs and parameter gradients), overfitting a
fixed batch, clear errors on bad input, and the FLOP count."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import titans_base
from nl_jax.mixers import attention_mask
from nl_jax.models import build_model
from nl_jax.models.titans import VARIANTS, PersistentAttention, Titans, memory_flops_per_token
from tests.memory.inputs import fresh_seed, max_tree_rel_err, rel_err

V, T = 64, 16


def _cfg(variant, **memory):
    """2 layers x d32, attention window 6, MAC segments of 8, memory chunks of 4 (overridable)."""
    cfg = titans_base.get_config().model
    cfg.update(vocab_size=V, d_model=32, num_layers=2, num_heads=4, mlp_hidden=64, sliding_window=6)
    cfg.titans.update(variant=variant, segment_size=8, persistent_tokens=2)
    cfg.titans.memory.update(chunk_size=4, max_lr=0.5)
    cfg.titans.memory.update(memory)
    return cfg


def _tokens(seed, batch=2, length=T):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, V)


def _split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def _forward_fn(model):
    graphdef, _, rest = _split(model)
    return jax.jit(lambda params, tokens: nnx.merge(graphdef, params, rest, copy=True)(tokens))


@pytest.mark.parametrize(
    "variant,overrides",
    [
        ("lmm", {}),
        ("mac", {}),
        ("mag", {}),  # window 6 < T / 2: the blocked sliding-window path
        ("mal", dict(sliding_window=0, scan_layers=False)),  # full attention: a cache of max_len
    ],
)
def test_causal_and_decoding_token_by_token_equals_the_full_forward(variant, overrides):
    seed = fresh_seed()
    cfg = _cfg(variant)
    cfg.update(overrides)
    model = build_model(cfg, nnx.Rngs(seed))
    graphdef, params, rest = _split(model)
    f = _forward_fn(model)
    tokens = _tokens(seed)
    full = f(params, tokens)
    assert full.shape == (2, T, V) and full.dtype == jnp.float32

    t = 9  # inside the second MAC segment and the third memory chunk
    changed = f(params, tokens.at[:, t].set((tokens[:, t] + 1) % V))
    np.testing.assert_array_equal(full[:, :t], changed[:, :t], err_msg=f"seed {seed}")
    assert np.all(np.abs(np.asarray(full[:, t:] - changed[:, t:])).max(axis=-1) > 0), seed

    @jax.jit
    def decode(params, tokens):
        m = nnx.merge(graphdef, params, rest, copy=True)
        step = lambda state, tok: m.decode_step(tok, state)[::-1]  # noqa: E731
        _, logits = jax.lax.scan(step, m.init_decode_state(tokens.shape[0], max_len=T), tokens.T)
        return jnp.moveaxis(logits, 0, 1)

    assert rel_err(decode(params, tokens), full) < 1e-5, seed


def test_blocked_sliding_window_with_persistent_tokens_equals_the_masked_form():
    seed = fresh_seed()
    attn = PersistentAttention(_cfg("mag"), 4, rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed), (2, 19, 32))  # not a multiple of the window
    pos = jnp.arange(19)
    q, k, v = attn._qkv(x, x, pos, pos)
    direct = attn.attend(q, k, v, attention_mask(pos, pos, 4))
    assert rel_err(attn(x), direct) < 1e-6, seed
    # Persistent tokens stay visible to every query, far past the window.
    before = attn(x)
    attn.persistent.value = 2.0 * attn.persistent[...]
    assert float(jnp.abs(attn(x)[:, -1] - before[:, -1]).min()) > 0, seed


@pytest.mark.parametrize(
    "variant,chunk",
    [("lmm", 1), ("mac", 4)] + [pytest.param(v, 1, marks=pytest.mark.slow) for v in ("mac", "mag", "mal")],
)
def test_chunked_memory_equals_token_by_token_reference(variant, chunk):
    """The same parameters run with the memory's chunked form and its naive (token-by-token, jax.grad
    inside) form: logits and the gradients of a loss with respect to every parameter agree."""
    seed = fresh_seed()
    memory = dict(chunk_size=chunk, read="per_token" if chunk > 1 else "post_update")
    fast_cfg = _cfg(variant, **memory)
    if chunk > 1:  # also: the stack's remat and the memory's per-chunk remat change nothing
        fast_cfg.remat_policy = "full"
        fast_cfg.titans.memory.remat_chunks = True
    fast = build_model(fast_cfg, nnx.Rngs(seed))
    ref = build_model(_cfg(variant, form="naive", **memory), nnx.Rngs(seed))
    tokens = _tokens(seed)
    targets = jnp.roll(tokens, -1, axis=1)

    def loss_and_grad(model):
        graphdef, params, rest = _split(model)

        def loss(p):
            logits = nnx.merge(graphdef, p, rest, copy=True)(tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (l_fast, y_fast), g_fast = loss_and_grad(fast)
    (l_ref, y_ref), g_ref = loss_and_grad(ref)
    assert rel_err(y_fast, y_ref) < 1e-5, seed
    assert abs(float(l_fast - l_ref)) < 1e-5, seed
    assert max_tree_rel_err(g_fast, g_ref) < 1e-4, seed
    mem_grads = [g for path, g in nnx.to_flat_state(g_fast) if "memory_init_w1" in str(path)]
    assert mem_grads and float(jnp.abs(mem_grads[0][...]).max()) > 0  # the meta-learned memory learns


@pytest.mark.slow
def test_tiny_titans_overfits_a_fixed_batch():
    cfg = _cfg("lmm", max_lr=0.1)  # the config default
    cfg.update(d_model=64, mlp_hidden=128)
    model = build_model(cfg, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (4, 33), 0, V)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    graphdef, params, rest = _split(model)
    tx = optax.adamw(1e-2, weight_decay=0.0)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p, rest, copy=True)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def train(params):
        def step(carry, _):
            p, o = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), o), loss

        _, losses = jax.lax.scan(step, (params, tx.init(params)), None, length=150)
        return losses

    losses = np.asarray(train(params))
    assert losses[0] > 3.5 and losses[-1] < 0.05, (losses[0], losses[-1])


def test_bad_input_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown titans variant 'mca'"):
        build_model(_cfg("mca"), nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"segment_size 6 must be a multiple of the memory chunk_size 4"):
        cfg = _cfg("mac")
        cfg.titans.segment_size = 6
        build_model(cfg, nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"segment_size 8 does not divide the sequence length 12"):
        build_model(_cfg("mac"), nnx.Rngs(0))(_tokens(0, length=12))
    with pytest.raises(ValueError, match=r"chunk_size 4 does not divide the sequence length 10"):
        build_model(_cfg("lmm"), nnx.Rngs(0))(_tokens(0, length=10))
    with pytest.raises(ValueError, match=r"memory form must be one of"):
        build_model(_cfg("lmm", form="fast"), nnx.Rngs(0))


def test_flops_count_the_memory_inner_loop():
    cfg = _cfg("lmm", structure="linear", read="boundary")
    h, dh = 4, 8
    assert memory_flops_per_token(cfg) == h * 3 * 2 * dh * dh  # key forward, update, query read
    cfg.titans.memory.read = "per_token"
    assert memory_flops_per_token(cfg) == h * (3 * 2 * dh * dh + 4 * 4 * dh)  # + scores over the chunk
    for variant in VARIANTS:
        cfg = _cfg(variant)
        flops = Titans.forward_flops_per_token(cfg, 64)
        # One multiply-add per token for every projection / conv / unembedding weight, plus the
        # memory's inner loop; attention scores come on top.
        state = nnx.state(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))), nnx.Param)
        kernels = sum(math.prod(x.shape) for path, x in nnx.to_flat_state(state) if path[-1] == "kernel")
        weights_and_memory = 2 * kernels + cfg.num_layers * memory_flops_per_token(cfg)
        if variant == "lmm":
            assert flops == weights_and_memory
        else:
            assert flops > weights_and_memory
    mac = _cfg("mac")
    longer = mac.copy_and_resolve_references()
    longer.titans.segment_size = 16
    assert Titans.forward_flops_per_token(longer, 64) > Titans.forward_flops_per_token(mac, 64)
