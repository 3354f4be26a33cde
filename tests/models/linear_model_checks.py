"""Checks shared by the RetNet, DeltaNet, Gated DeltaNet and Comba tests (they differ only in the mechanism).

Each test file calls these with its model name. Inputs come from a fresh seed per run (set
NL_JAX_TEST_SEED to replay one; the seed is in every failure message).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import configs
from nl_jax.models import build_model
from tests.memory.inputs import fresh_seed, max_grad_err, max_tree_rel_err, rel_err


def jit(f, **kwargs):
    """jax.jit with LLVM optimisation off: these tests compile far more than they run, and on CPU this
    halves compile times for slightly slower steps (the numerics are the same HLO)."""
    return jax.jit(f, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)


def bench_cfg(name, **overrides):
    """The family's tiny config with 2 of its 4 layers and chunks of 8 (so sequences span several)."""
    cfg = configs.load(f"{name}_tiny").model
    cfg.update(num_layers=2, chunk_size=8)
    cfg.update(overrides)
    return cfg


class Bench:
    """What the checks of one test file share: one model, its data, and jitted functions (building
    and compiling dominate the cost of these tests on CPU, so each happens once)."""

    def __init__(self, name: str):
        self.name, self.seed = name, fresh_seed()
        self.cfg = bench_cfg(name)
        self.model = build_model(self.cfg, nnx.Rngs(self.seed))
        self.graphdef, self.params = nnx.split(self.model, nnx.Param)
        # 16 symbols: each recurs with many successors, so only the context (the mixer) can fit them.
        tokens = jax.random.randint(jax.random.key(self.seed), (4, 33), 0, 16)
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]

        def loss(params, form):
            logits = nnx.merge(self.graphdef, params)(self.inputs, form=form)
            return optax.softmax_cross_entropy_with_integer_labels(logits, self.targets).mean()

        self.loss_and_grad = jit(jax.value_and_grad(loss), static_argnames="form")
        self.prefill = jit(lambda t, s: self.model.forward_with_state(t, s))
        self.step = jit(lambda t, s: self.model.decode_step(t, s))


def check_causality_and_decode(bench: Bench, length=20):
    """Causal; token-by-token decode (memory_recurrent) == the chunked prefill (memory_chunked; the
    length is not a multiple of the chunk, so the chunked form pads): logits and final state."""
    model, seed, vocab = bench.model, bench.seed, bench.cfg.vocab_size
    tokens = bench.inputs[:2, :length]
    full, chunked_state = bench.prefill(tokens, model.init_decode_state(2))
    assert full.shape == (2, length, vocab) and full.dtype == jnp.float32
    changed, _ = bench.prefill(tokens.at[:, 11].set((tokens[:, 11] + 1) % vocab), model.init_decode_state(2))
    np.testing.assert_array_equal(full[:, :11], changed[:, :11], err_msg=f"seed {seed}")
    assert np.all(np.abs(np.asarray(full[:, 11:] - changed[:, 11:])).max(axis=-1) > 0), seed

    state = model.init_decode_state(2)
    logits = []
    for i in range(length):
        out, state = bench.step(tokens[:, i], state)
        logits.append(out)
    assert rel_err(jnp.stack(logits, 1), full) < 1e-5, seed
    assert max_tree_rel_err(chunked_state, state) < 1e-5, seed
    assert float(jnp.linalg.norm(state.memory)) > 1e-2, seed  # the state is not trivially zero
    assert int(state.pos[0]) == length


def check_chunked_equals_naive(bench: Bench):
    """The training forward (memory_chunked) == the token-by-token reference (memory_naive) with the
    same parameters: loss and the gradient wrt every parameter, leaf by leaf.

    The gradient tolerance is 5e-5, not the memory ops' 1e-5 (tests/memory holds that contract): here
    float32 rounding of two summation orders passes through two whole layers and back. For retnet
    over seven seeds the worst leaf was 9e-7 .. 1.3e-5 (seed 17346051); a wrong chunk term is
    orders of magnitude larger. Each leaf is compared to the larger of its own norm and the whole
    gradient's (`max_grad_err`), so a gate bias whose gradient is tiny by cancellation does not
    fail on rounding alone; 1e-3 of each leaf's own norm still catches a wrong term in any leaf."""
    loss_c, g_c = bench.loss_and_grad(bench.params, "chunked")
    loss_n, g_n = bench.loss_and_grad(bench.params, "naive")
    assert rel_err(loss_c, loss_n) < 1e-6, bench.seed
    assert max_grad_err(g_c, g_n) < 5e-5, bench.seed
    assert max_tree_rel_err(g_c, g_n) < 1e-3, bench.seed


def check_overfits(bench: Bench, steps=80):
    """The tiny config (2 of its layers) memorises a fixed small batch with AdamW, far below what
    the current token alone allows (~ln 6 for 16 symbols over 128 positions)."""
    tx = optax.adamw(optax.cosine_decay_schedule(1e-2, steps), weight_decay=0.0)
    update = jit(lambda g, o, p: tx.update(g, o, p))
    params, opt_state, losses = bench.params, tx.init(bench.params), []
    for _ in range(steps):
        loss, grads = bench.loss_and_grad(params, "chunked")
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    assert losses[0] > 5.0, losses[0]  # ~ln(260) at init
    assert losses[-1] < 0.1, losses[-10:]


def check_bfloat16(bench: Bench):
    model = build_model(bench_cfg(bench.name, dtype="bfloat16"), nnx.Rngs(bench.seed))
    assert model.blocks.layers.attn.q_proj.kernel[...].dtype == jnp.float32
    logits = jit(lambda t: model(t))(bench.inputs)
    assert logits.dtype == jnp.float32
    ref = jit(lambda t: bench.model(t))(bench.inputs)
    np.testing.assert_allclose(logits, ref, atol=5e-2, err_msg=f"seed {bench.seed}")


# ---- the textbook layer, written out in float64 numpy from the layer's parameters ----


def _np(p):
    return np.asarray(p[...], np.float64)


def _silu(z):
    return z / (1 + np.exp(-z))


def _conv(z, w):
    """Causal depthwise conv: y_t = sum_i w[i] z_{t-W+1+i}, zero history."""
    width = w.shape[0]
    zp = np.concatenate([np.zeros((z.shape[0], width - 1, z.shape[2])), z], axis=1)
    return sum(zp[:, i : i + z.shape[1]] * w[i] for i in range(width))


def _rope(z, theta):
    d = z.shape[-1]
    freqs = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.arange(z.shape[1])[:, None] * freqs  # [T, d/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = z[..., : d // 2], z[..., d // 2 :]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def reference_mixer(mixer, x, mechanism):
    """fla's layer for `mechanism`, token by token: x [B, T, D] float64 -> y [B, T, D]."""
    s = mixer.s
    b, t, d = x.shape
    h, dk, dv = s.num_heads, s.head_dim, s.value_dim
    proj = lambda lin: np.einsum("btd,d...->bt...", x, _np(lin.kernel))  # noqa: E731
    q, k, v = proj(mixer.q_proj), proj(mixer.k_proj), proj(mixer.v_proj)
    if s.conv_width:
        q, k, v = (
            _silu(_conv(z.reshape(b, t, -1), _np(c.kernel))).reshape(z.shape)
            for z, c in ((q, mixer.q_conv), (k, mixer.k_conv), (v, mixer.v_conv))
        )
    if s.qk_norm == "l2":
        q, k = (z / np.sqrt(np.sum(z * z, -1, keepdims=True) + 1e-6) for z in (q, k))
    if s.rope_theta:
        q, k = _rope(q, s.rope_theta), _rope(k, s.rope_theta)
    q = q * dk**-0.5
    o = np.zeros((b, t, h, dv))
    for bi in range(b):
        for hi in range(h):
            S = np.zeros((dv, dk))
            for ti in range(t):
                kk, vv, qq = k[bi, ti, hi], v[bi, ti, hi], q[bi, ti, hi]
                if mechanism == "linear_attention":
                    gamma = 1 - 2.0 ** (-5 - hi)
                    S = gamma * S + np.outer(vv, kk)
                else:
                    beta = 1 / (1 + np.exp(-proj(mixer.b_proj)[bi, ti, hi]))
                    alpha, pp = 1.0, kk
                    if mechanism in ("gated_delta_rule", "comba"):
                        a = proj(mixer.a_proj)[bi, ti, hi] + _np(mixer.dt_bias)[hi]
                        alpha = np.exp(-np.exp(_np(mixer.A_log)[hi]) * np.log1p(np.exp(a)))
                    if mechanism == "comba":  # erase at p = sigmoid(lambda) k; read at q - d p
                        pp = kk / (1 + np.exp(-_np(mixer.inner_decay)[hi]))
                        qq = qq - _np(mixer.correction)[hi] * pp * dk**-0.5
                    S = alpha * S @ (np.eye(dk) - beta * np.outer(pp, kk)) + beta * np.outer(vv, kk)
                o[bi, ti, hi] = S @ qq
    o = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + mixer.o_norm.eps) * _np(mixer.o_norm.scale)
    if s.output_gate:
        g = proj(mixer.g_proj)
        o = o * (_silu(g) if s.output_gate_act == "silu" else 1 / (1 + np.exp(-g)))
    return np.einsum("bthv,hvd->btd", o, _np(mixer.o_proj.kernel))


def first_mixer(model):
    """Layer 0's mixer as a standalone module (the stacked parameters sliced at 0)."""
    graphdef, state = nnx.split(model.blocks.layers.attn)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))


def check_mixer_is_textbook(bench: Bench):
    """One layer's chunked forward == the recurrence written out from its parameters (float64)."""
    mixer = first_mixer(bench.model)
    x = jax.random.normal(jax.random.key(bench.seed + 1), (2, 12, bench.cfg.d_model))
    y, _ = jit(lambda x: mixer(x))(x)
    want = reference_mixer(mixer, np.asarray(x, np.float64), mixer.s.mechanism)
    assert rel_err(y, jnp.asarray(want, jnp.float32)) < 1e-5, bench.seed


def check_flops(name):
    """forward_flops_per_token == XLA's count of the lowered program for one layer and one chunk (where
    `cost_analysis`, which counts a scan body once, sees everything), within 5%: XLA also counts the
    elementwise ops."""
    cfg = bench_cfg(name, num_layers=1, scan_layers=False, chunk_size=64, d_model=256, mlp_hidden=512)
    model = build_model(cfg, nnx.Rngs(0))
    tokens = jnp.zeros((1, 64), jnp.int32)
    xla = jax.jit(lambda t: model(t)).lower(tokens).cost_analysis()["flops"] / 64
    analytic = type(model).forward_flops_per_token(cfg, 64)
    assert abs(analytic / xla - 1) < 0.05, (analytic, xla)
