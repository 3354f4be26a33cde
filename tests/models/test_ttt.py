"""TTT-Linear / TTT-MLP (inner LayerNorm, fast biases, token_idx scaling; ttt-lm-jax's layer, whose
mini-batch dual form is checked in tests/memory/test_ops_ttt.py): the chunked inner loop == the
token-by-token reference (loss, every parameter's gradient), causality, decode step by step ==
prefill in pieces == the full forward (logits and final state), overfitting a fixed batch, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import configs
from nl_jax.models import build_model, count_params
from nl_jax.models.ttt import TTT
from tests.memory.inputs import fresh_seed, max_grad_err, max_tree_rel_err, rel_err
from tests.memory.ttt_reference import dual_form, gelu, layer_norm
from tests.models import linear_model_checks as checks


class Bench:
    """One model of ttt_tiny's shape (2 of its layers, mini-batches of 8) and its jitted functions,
    with the attributes the shared checks of linear_model_checks use."""

    def __init__(self, layer: str):
        self.seed = fresh_seed()
        self.cfg = configs.load("ttt_tiny").model
        self.cfg.update(num_layers=2, mini_batch_size=8, ttt_layer=layer)
        self.model = build_model(self.cfg, nnx.Rngs(self.seed))
        self.graphdef, self.params = nnx.split(self.model, nnx.Param)
        # 16 symbols: each recurs with many successors, so only the context (the mixer) can fit them.
        tokens = jax.random.randint(jax.random.key(self.seed), (4, 33), 0, 16)
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]

        def loss(params, form):
            logits = nnx.merge(self.graphdef, params)(self.inputs, form=form)
            return optax.softmax_cross_entropy_with_integer_labels(logits, self.targets).mean()

        self.loss_and_grad = checks.jit(jax.value_and_grad(loss), static_argnames="form")
        self.forward = checks.jit(lambda t: self.model(t))
        self.prefill = checks.jit(
            lambda t, s, form: self.model.forward_with_state(t, s, form), static_argnames="form"
        )
        self.step = checks.jit(lambda t, s: self.model.decode_step(t, s))


_BENCHES = {}


def _bench(layer: str) -> Bench:
    """One Bench per layer kind for this module (building and compiling dominate on CPU)."""
    if layer not in _BENCHES:
        _BENCHES[layer] = Bench(layer)
    return _BENCHES[layer]


@pytest.fixture(params=["linear", "mlp"])
def bench(request):
    return _bench(request.param)


def test_chunked_equals_token_by_token_reference_loss_and_grads(bench):
    """memory_chunked (the dual form) == memory_naive (token by token, jax.grad): the loss, and the
    gradient of every parameter leaf to 1e-5 of the larger of its norm and the whole gradient's
    (`max_grad_err`), each leaf also to 1e-3 of its own. Leaf by leaf at 1e-5 of itself fails on
    rounding alone: the learning-rate bias's gradient is about 1e-5 of the whole gradient's norm and
    came out 1.04e-5 of itself apart at seed 792793133 (4.8e-6 on another machine); the token
    offsets (`learnable_token_idx`) sum <dL/dW, W_t - W_B>, which the reference forms from running
    weights rounded at the scale of W (tests/memory/test_ops_ttt.py checks that gradient, through
    the rates, to 1e-5)."""
    loss_c, g_c = bench.loss_and_grad(bench.params, "chunked")
    loss_n, g_n = bench.loss_and_grad(bench.params, "naive")
    assert rel_err(loss_c, loss_n) < 1e-6, bench.seed
    assert max_grad_err(g_c, g_n) < 1e-5, bench.seed
    assert max_tree_rel_err(g_c, g_n) < 1e-3, bench.seed


def test_causality_and_decode_equal_the_full_forward(bench):
    """Causal; decode steps (memory_recurrent) == prefill in pieces that start and end inside
    mini-batches (memory_stream) == the full chunked forward; final states of those and of the
    token-by-token reference (memory_naive) agree."""
    model, seed, vocab = bench.model, bench.seed, bench.cfg.vocab_size
    tokens = bench.inputs[:2, :24]
    full = bench.forward(tokens)
    assert full.shape == (2, 24, vocab) and full.dtype == jnp.float32
    changed = bench.forward(tokens.at[:, 11].set((tokens[:, 11] + 1) % vocab))  # inside mini-batch 2
    assert float(jnp.abs(full[:, :11] - changed[:, :11]).max()) == 0.0, seed
    assert float(jnp.abs(full[:, 11:] - changed[:, 11:]).max(axis=-1).min()) > 0, seed

    state0 = model.init_decode_state(2)
    logits, state = [], state0
    for i in range(24):
        out, state = bench.step(tokens[:, i], state)
        logits.append(out)
    assert rel_err(jnp.stack(logits, 1), full) < 1e-5, seed
    pieces, streamed = [], state0
    for a in range(0, 24, 6):  # pieces of 6 start and end at every position mod 8, some cross a boundary
        out, streamed = bench.prefill(tokens[:, a : a + 6], streamed, "chunked")
        pieces.append(out)
    assert rel_err(jnp.concatenate(pieces, 1), full) < 1e-5, seed
    _, naive = bench.prefill(tokens, state0, "naive")
    assert max_tree_rel_err(streamed, naive) < 1e-5, seed
    assert max_tree_rel_err(state, naive) < 1e-5, seed
    # the fast weights and biases were trained, and the mini-batch position is carried
    memory, memory0 = naive.ttt.memory, state0.ttt.memory
    for w, w0 in zip(jax.tree.leaves(memory.weights), jax.tree.leaves(memory0.weights)):
        assert rel_err(w, w0) > 1e-3, seed
    assert int(memory.step[0]) == 24 % bench.cfg.mini_batch_size


def _np(p):
    return np.asarray(p[...], np.float64)


def test_layer_is_the_ttt_lm_jax_layer(bench):
    """Layer 0 (its vectors drawn at random, not at their init) == ttt-lm-jax's TTTLinear / TTTMLP
    written out in float64 numpy: projections, causal convs with bias, RoPE at t mod C, the gated
    inner lr / head_dim, token_idx with learned offsets, the dual form of tests/memory/ttt_reference,
    post LayerNorm and the GELU output gate."""
    seed, cfg = bench.seed, bench.cfg
    graphdef, params = nnx.split(bench.model.blocks.layers.ttt, nnx.Param)
    key = jax.random.key(seed + 2)
    rnd = lambda p: p + 0.3 * jax.random.normal(jax.random.fold_in(key, p.size), p.shape)  # noqa: E731
    params = jax.tree.map(lambda p: p[0] if p.ndim > 2 else rnd(p[0]), params)  # layer 0; vectors moved
    layer = nnx.merge(graphdef, params)
    x = jax.random.normal(jax.random.fold_in(key, 1), (1, 16, cfg.d_model))
    y = checks.jit(lambda x: layer(x)[0])(x)

    h, hd, c, t = cfg.num_heads, cfg.d_model // cfg.num_heads, cfg.mini_batch_size, x.shape[1]
    xn = np.asarray(x[0], np.float64)

    def conv(z, module):  # flax nn.Conv(padding="CAUSAL"), depthwise, with bias
        w = _np(module.conv.kernel)
        zp = np.concatenate([np.zeros((w.shape[0] - 1, z.shape[1])), z])
        return sum(zp[i : i + t] * w[i] for i in range(w.shape[0])) + _np(module.bias)

    def rope(z):  # rotate-half layout at the position inside the mini-batch
        ang = (np.arange(t) % c)[:, None] * (1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd))
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = z[..., : hd // 2], z[..., hd // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    xqk = (xn @ _np(layer.wq.kernel).reshape(cfg.d_model, -1)).reshape(t, -1)
    xq = rope(conv(xqk, layer.q_conv).reshape(t, h, hd))
    xk = rope(conv(xqk, layer.k_conv).reshape(t, h, hd))
    xv = np.einsum("td,dhe->the", xn, _np(layer.wv.kernel))
    base_lr = {"linear": 1.0, "mlp": 0.1}[cfg.ttt_layer]
    lr = base_lr / (1 + np.exp(-(xn @ _np(layer.lr_proj.kernel) + _np(layer.lr_bias)))) / hd  # [T, H]
    tau = np.maximum(1.0 / (np.arange(t) % c + 1) + _np(layer.learnable_token_idx)[np.arange(t) % c], 0.0)
    g, beta = _np(layer.ttt_norm_scale).reshape(h, hd), _np(layer.ttt_norm_shift).reshape(h, hd)
    per_head = lambda name, width: _np(getattr(layer, f"memory_init_{name}")).reshape(h, 1, width)  # noqa: E731
    tr = lambda name: np.swapaxes(_np(getattr(layer, f"memory_init_{name}")), -1, -2)  # noqa: E731
    if cfg.ttt_layer == "linear":  # TTT's (W1 [in, out], b1)
        ttt_params = (tr("w"), per_head("b", hd))
    else:  # TTT's (W1, W2, b1, b2): W1 the input side, b1 the hidden bias
        hid = cfg.ttt_mlp_expand * hd
        ttt_params = (tr("w2"), tr("w1"), per_head("b2", hid), per_head("b1", hd))
    z = np.stack(
        [
            dual_form(
                cfg.ttt_layer, [p[i] for p in ttt_params], xq[:, i], xk[:, i], xv[:, i], lr[:, i],
                tau, g[i], beta[i], c,
            )[1]
            for i in range(h)
        ],
        axis=1,
    ).reshape(t, -1)  # fmt: skip
    z = layer_norm(z, _np(layer.post_norm.scale), _np(layer.post_norm.bias), cfg.norm_eps)[0]
    want = (z * gelu(xn @ _np(layer.wg.kernel))) @ _np(layer.wo.kernel)
    assert rel_err(y[0], jnp.asarray(want, jnp.float32)) < 1e-5, seed


def test_tiny_config_overfits():
    checks.check_overfits(_bench("linear"))  # ttt_tiny is TTT-Linear


def test_bad_input_is_rejected(bench):
    with pytest.raises(ValueError, match="mini_batch_size 8 does not divide the sequence length 10"):
        bench.model(jnp.zeros((1, 10), jnp.int32))
    with pytest.raises(ValueError, match="form must be one of"):
        bench.model(jnp.zeros((1, 8), jnp.int32), form="parallel")
    # one bad setting per bench (building is the slow part)
    field, value, message = {
        "linear": ("ttt_layer", "conv", "ttt_layer must be one of"),
        "mlp": ("num_heads", 3, "not divisible by num_heads"),
    }[bench.cfg.ttt_layer]
    bad = configs.load("ttt_tiny").model
    bad.update({"num_layers": 1, field: value})
    with pytest.raises(ValueError, match=message):
        build_model(bad, nnx.Rngs(0))


# Exact parameter counts of the named configs (the README table; update both if a shape changes).
EXACT = {
    "ttt_tiny": 915_664,
    "ttt_340m": 337_684_224,
    "ttt_760m": 733_608_192,
    "ttt_1_3b": 1_285_639_296,
}


@pytest.mark.parametrize("config_name", sorted(EXACT))
def test_config_parameter_counts(config_name):
    assert count_params(configs.load(config_name).model) == EXACT[config_name]


def test_flops_per_token_counts_the_matmuls():
    cfg = configs.load("ttt_760m").model
    flops = TTT.forward_flops_per_token(cfg, 4096)
    n_params = EXACT["ttt_760m"]
    assert 2 * n_params < flops < 2.5 * n_params  # 2 N plus the inner loop (tied embedding used twice)
    cfg.ttt_layer = "mlp"
    assert TTT.forward_flops_per_token(cfg, 4096) > flops
