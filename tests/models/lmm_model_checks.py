"""Checks shared by the DLA and Memora tests: both are the Titans LMM shell with another memory update
(nl_jax/models/dla.py, nl_jax/models/memora.py), so they share one small bench config and the same
checks (causality, decoding = the forward, chunked = the token-by-token reference, overfitting).

Inputs come from a fresh seed per run (set NL_JAX_TEST_SEED to replay one; the seed is in every
failure message).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import configs
from nl_jax.models import build_model
from nl_jax.models.titans import memory_flops_per_token
from tests.memory.inputs import fresh_seed, max_tree_rel_err, rel_err

V, T = 64, 16


def bench_cfg(name, **memory):
    """The family's tiny config cut to 2 layers x d32, 4 memory heads of 8, memory chunks of 4."""
    cfg = configs.load(f"{name}_tiny").model
    cfg.update(vocab_size=V, d_model=32, num_layers=2, num_heads=4, mlp_hidden=64)
    hidden = 32 if cfg.titans.memory.hidden else 0  # memora widens its memory MLP 4x
    cfg.titans.memory.update(chunk_size=4, hidden=hidden)
    cfg.titans.memory.update(memory)
    return cfg


def tokens(seed, batch=2, length=T):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, V)


def _split(model):
    return nnx.split(model, nnx.Param, ...)


def check_causal_and_decode(name):
    """Causal; decoding token by token (the memory's one-token step, on the same chunk grid) gives
    the logits of the chunked training forward."""
    seed = fresh_seed()
    model = build_model(bench_cfg(name), nnx.Rngs(seed))
    graphdef, params, rest = _split(model)
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p, rest, copy=True)(t))
    toks = tokens(seed)
    full = forward(params, toks)
    assert full.shape == (2, T, V) and full.dtype == jnp.float32
    t = 9  # inside the third memory chunk
    changed = forward(params, toks.at[:, t].set((toks[:, t] + 1) % V))
    np.testing.assert_array_equal(full[:, :t], changed[:, :t], err_msg=f"seed {seed}")
    assert np.all(np.abs(np.asarray(full[:, t:] - changed[:, t:])).max(axis=-1) > 0), seed

    @jax.jit
    def decode(params, toks):
        m = nnx.merge(graphdef, params, rest, copy=True)
        step = lambda state, tok: m.decode_step(tok, state)[::-1]  # noqa: E731
        state, logits = jax.lax.scan(step, m.init_decode_state(toks.shape[0]), toks.T)
        return jnp.moveaxis(logits, 0, 1), state

    logits, state = decode(params, toks)
    assert rel_err(logits, full) < 1e-5, seed
    return state


def check_chunked_equals_naive(name):
    """The same parameters with the memory's chunked form and its token-by-token reference (form
    'naive', jax.grad inside): logits, loss and the gradient wrt every parameter agree."""
    seed = fresh_seed()
    fast = build_model(bench_cfg(name), nnx.Rngs(seed))
    ref = build_model(bench_cfg(name, form="naive"), nnx.Rngs(seed))
    toks = tokens(seed)
    targets = jnp.roll(toks, -1, axis=1)

    def loss_and_grad(model):
        graphdef, params, rest = _split(model)

        def loss(p):
            logits = nnx.merge(graphdef, p, rest, copy=True)(toks)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (l_fast, y_fast), g_fast = loss_and_grad(fast)
    (l_ref, y_ref), g_ref = loss_and_grad(ref)
    assert rel_err(y_fast, y_ref) < 1e-5, seed
    assert abs(float(l_fast - l_ref)) < 1e-5, seed
    assert max_tree_rel_err(g_fast, g_ref) < 1e-4, seed
    mem_grads = [g for path, g in nnx.to_flat_state(g_fast) if "memory_init_w1" in str(path)]
    assert mem_grads and float(jnp.abs(mem_grads[0][...]).max()) > 0, seed  # the initial memory learns


def check_overfits(name, steps=150):
    """The bench model memorises a fixed batch with AdamW: the whole model, inner loop included,
    trains end to end."""
    cfg = bench_cfg(name)
    cfg.update(d_model=64, mlp_hidden=128)
    model = build_model(cfg, nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(3), (4, 33), 0, V)
    inputs, targets = toks[:, :-1], toks[:, 1:]
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

        return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[1]

    losses = np.asarray(train(params))
    assert losses[0] > 3.5 and losses[-1] < 0.05, (losses[0], losses[-1])


def check_flops(name):
    """forward_flops_per_token: one multiply-add per token for every projection / conv / unembedding
    weight (the rates: lr and forget gates only, no momentum gate), plus the memory's inner loop."""
    cfg = bench_cfg(name)
    model_cls = type(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))))
    state = nnx.state(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))), nnx.Param)
    kernels = sum(math.prod(x.shape) for path, x in nnx.to_flat_state(state) if path[-1] == "kernel")
    want = 2 * kernels + cfg.num_layers * memory_flops_per_token(cfg)
    assert model_cls.forward_flops_per_token(cfg, 64) == want
