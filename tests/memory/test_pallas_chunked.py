"""The Pallas kernels of the chunked form (`memory_chunked(impl="pallas")`, run in interpret mode on
CPU, in both layouts) against the XLA chunked form: outputs, final states (weights and momentum)
and gradients with respect to q, k, v, every rate and the initial state, float32, to a relative
error under 1e-5.

Interpret mode runs the kernel's grid step by step in Python, so shapes are tiny.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from nl_jax.memory import ops
from nl_jax.memory.ops import pallas_chunked, presets
from nl_jax.models import build_model
from nl_jax.parallel.mesh import make_mesh
from tests.memory.inputs import fresh_seed, max_grad_err, max_tree_rel_err, rel_err, unit

TOL = 1e-5
# (batch, length, heads, key width, value width, chunk): several chunks, one chunk, Dv != Dk, chunk 1;
# for the MLP memory the fifth entry is its hidden width (it maps D to D)
SHAPES = [(2, 16, 2, 8, 8, 4), (1, 8, 1, 4, 6, 8), (1, 6, 2, 6, 4, 3), (1, 3, 1, 4, 4, 1)]
# (structure, objective, retention, dgd, momentum, activation). Linear: the gated delta rule (dot +
# retention + dgd), DeltaNet (dot + dgd), linear attention with decay (dot + retention), the l2
# rules with and without DGD; with momentum: Titans' memory (l2 + retention), deep linear attention
# (dot + retention), the self-modifying rule (l2 + retention + dgd), DGD with momentum alone. MLP:
# Titans (l2 + retention + momentum), HOPE's self-modifying memories (+ dgd), the self-modifying
# rule without momentum, deep linear attention (dot + retention), plain inner GD.
RULES = [
    ("linear", "dot", True, True, False, "silu"),
    ("linear", "dot", False, True, False, "silu"),
    ("linear", "dot", True, False, False, "silu"),
    ("linear", "l2", True, False, False, "silu"),
    ("linear", "l2", True, True, False, "silu"),
    ("linear", "l2", True, False, True, "silu"),
    ("linear", "dot", True, False, True, "silu"),
    ("linear", "l2", True, True, True, "silu"),
    ("linear", "dot", False, True, True, "silu"),
    ("mlp", "l2", True, False, True, "silu"),
    ("mlp", "l2", True, True, True, "silu"),
    ("mlp", "l2", True, True, False, "gelu"),
    ("mlp", "dot", True, False, False, "silu"),
    ("mlp", "l2", False, False, False, "tanh"),
]
# every rule in both kernel layouts, shapes and reads rotating
_N = len(RULES)
CASES = [
    (SHAPES[i % len(SHAPES)], RULES[i % _N], ops.READ_MODES[i % 3], pallas_chunked.LAYOUTS[i // _N])
    for i in range(2 * _N)
]


def _inputs(seed, shape, structure, objective, retention, dgd, momentum, activation="silu"):
    """Random inputs whose gates include exact 0s and 1s (a saturated gate reaches both in float32);
    the initial state `ws` = (weights, momentum or None)."""
    b, t, h, dk, dv, _ = shape
    ks = jax.random.split(jax.random.key(seed), 9)
    q, k = unit(jax.random.normal(ks[0], (b, t, h, dk))), unit(jax.random.normal(ks[1], (b, t, h, dk)))
    v = jax.random.normal(ks[2], (b, t, h, dv if structure == "linear" else dk))

    def gate(key, low):
        g = low + (1 - low) * jax.nn.sigmoid(jax.random.normal(key, (b, t, h)))
        pick = jax.random.randint(jax.random.fold_in(key, 1), (b, t, h), 0, 6)
        return jnp.where(pick == 0, 0.0, jnp.where(pick == 1, 1.0, g))

    rates = ops.Rates(
        lr=gate(ks[3], 0.0),
        retention=gate(ks[4], 0.5) if retention else None,
        dgd=gate(ks[5], 0.0) if dgd else None,
        momentum=gate(ks[7], 0.0) if momentum else None,
    )
    spec = ops.MemorySpec(structure, objective, activation)
    init = lambda key: ops.init_weights(spec, key, (b, h), dk, value_dim=dv, hidden=dv, scale=0.3)  # noqa: E731
    if structure == "mlp":
        init = lambda key: ops.init_weights(spec, key, (b, h), dk, hidden=dv, scale=0.3)  # noqa: E731
    ws = (init(ks[6]), init(ks[8]) if momentum else None)
    return spec, ws, q, k, v, rates


def _state(ws):
    weights, momentum = ws
    state = ops.init_state(weights, momentum=momentum is not None)
    return state if momentum is None else state._replace(momentum=momentum)


def _loss(impl, spec, chunk, read, cot_y, cot_ws, layout="grid"):
    """A scalar of the outputs and the final state with fixed random cotangents."""

    def loss(ws, q, k, v, rates):
        kw = dict(chunk_size=chunk, read=read)
        if impl == "xla":
            y, s = ops.memory_chunked(spec, _state(ws), q, k, v, rates, **kw)
        else:
            y, s = pallas_chunked.memory_chunked_pallas(spec, _state(ws), q, k, v, rates, **kw, layout=layout)
        final = jax.tree.leaves((s.weights, s.momentum))
        scalar = jnp.sum(y * cot_y) + sum(jnp.sum(a * c) for a, c in zip(final, jax.tree.leaves(cot_ws)))
        return scalar, (y, s)

    return loss


def _cotangents(seed, y, state):
    """Random cotangents for outputs like `y` and states like `state` (a pytree)."""
    key = jax.random.key(seed + 1)
    leaves, treedef = jax.tree.flatten(state)
    normal = lambda i, x: jax.random.normal(jax.random.fold_in(key, i + 1), x.shape)  # noqa: E731
    return jax.random.normal(key, y.shape), jax.tree.unflatten(
        treedef, [normal(i, x) for i, x in enumerate(leaves)]
    )


@pytest.mark.parametrize("shape,rule,read,layout", CASES)
def test_kernel_equals_xla_chunked(shape, rule, read, layout):
    seed = fresh_seed()
    spec, ws, q, k, v, rates = _inputs(seed, shape, *rule)
    cot_y, cot_ws = _cotangents(seed, v, ws)
    args = (ws, q, k, v, rates)
    loss = {impl: _loss(impl, spec, shape[-1], read, cot_y, cot_ws, layout) for impl in ops.IMPLS}
    grads = {impl: jax.grad(fn, range(5), has_aux=True)(*args) for impl, fn in loss.items()}
    g_ref, (y_ref, s_ref) = grads["xla"]
    g, (y, s) = grads["pallas"]
    assert rel_err(y, y_ref) < TOL, seed
    assert max_tree_rel_err(s.weights, s_ref.weights) < TOL, seed
    if rule[4]:  # momentum
        assert max_tree_rel_err(s.momentum, s_ref.momentum) < TOL, seed
    assert int(s.step) == 0 and max_tree_rel_err(s.boundary, s.weights) == 0
    assert max_grad_err(g, g_ref) < TOL, seed
    assert max_tree_rel_err(g, g_ref) < 1e-3, seed  # each leaf on its own (see max_grad_err)


@pytest.mark.parametrize("layout", pallas_chunked.LAYOUTS)
def test_kernel_equals_naive_gated_delta_rule(layout):
    """The kernel against the token-by-token reference too, through the gated delta rule preset."""
    seed = fresh_seed()
    _, ws, q, k, v, rates = _inputs(seed, (1, 8, 2, 4, 4, 4), "linear", "dot", True, True, False)
    m = presets.gated_delta_rule(rates.retention, rates.lr)
    state = _state(ws)
    y_ref, s_ref = ops.memory_naive(m.spec, state, q, k, v, m.rates, chunk_size=1, read=m.read)
    kw = dict(chunk_size=4, read=m.read, layout=layout)
    y, s = pallas_chunked.memory_chunked_pallas(m.spec, state, q, k, v, m.rates, **kw)
    assert rel_err(y, y_ref) < TOL, seed
    assert rel_err(s.weights.w, s_ref.weights.w) < TOL, seed


@pytest.mark.parametrize("structure", ["linear", "mlp"])
@pytest.mark.parametrize("preset", ["titans", "self_modifying"])
def test_kernel_equals_naive_momentum_rules(preset, structure):
    """Titans' update (weight decay and surprise momentum, post-update reads) and the self-modifying
    update (DGD, weight decay, momentum, per-token reads), on a linear and an MLP memory: the kernel
    against the token-by-token reference with the same chunk (gradients at each chunk's first
    state): outputs, weights and momentum."""
    seed = fresh_seed()
    _, ws, q, k, v, rates = _inputs(seed, (2, 12, 2, 4, 6, 4), structure, "l2", True, False, True)
    if preset == "titans":
        m = presets.titans(rates.lr, 1.0 - rates.retention, rates.momentum, structure=structure)
    else:
        m = presets.self_modifying(rates.lr, rates.retention, rates.momentum, structure=structure)
    state = _state(ws)
    y_ref, s_ref = ops.memory_naive(m.spec, state, q, k, v, m.rates, chunk_size=4, read=m.read)
    y, s = ops.memory_chunked(m.spec, state, q, k, v, m.rates, chunk_size=4, read=m.read, impl="pallas")
    assert rel_err(y, y_ref) < TOL, seed
    assert max_tree_rel_err(s.weights, s_ref.weights) < TOL, seed
    assert max_tree_rel_err(s.momentum, s_ref.momentum) < TOL, seed


def test_unsupported_spec_raises_one_clear_error():
    spec = ops.MemorySpec("mlp", "l2", bias=True)
    weights = ops.init_weights(spec, jax.random.key(0), (1, 1), 4, hidden=4)
    state = ops.init_state(weights, momentum=True)
    x = jnp.ones((1, 4, 1, 4))
    rates = ops.Rates(lr=jnp.ones((1, 4, 1)), momentum=jnp.ones((1, 4, 1)))
    with pytest.raises(ValueError, match=r"this call has bias=True: use impl='xla'"):
        ops.memory_chunked(spec, state, x, x, x, rates, chunk_size=4, impl="pallas")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.memory_chunked(spec, state, x, x, x, rates, chunk_size=4, impl="triton")


def test_unsupported_lists_nothing_for_the_gated_delta_rule():
    m = presets.gated_delta_rule(jnp.ones((1, 4, 1)), jnp.ones((1, 4, 1)))
    assert pallas_chunked.unsupported(m.spec, m.rates, None) == []


def _gated_deltanet(cfg):
    cfg.update(num_layers=1, chunk_size=8, d_model=32, num_heads=2, head_dim=8, mlp_hidden=32)
    return cfg, "memory_impl"


def _titans(structure):
    def shrink(cfg):
        cfg.update(num_layers=1, d_model=32, num_heads=2, mlp_hidden=32)
        cfg.titans.memory.update(structure=structure, chunk_size=8)
        return cfg.titans.memory, "impl"

    return shrink


MODELS = [
    ("gated_deltanet_tiny", _gated_deltanet),
    ("titans_tiny", _titans("linear")),
    ("titans_tiny", _titans("mlp")),
]


@pytest.mark.parametrize("name,shrink", MODELS)
def test_model_with_pallas_equals_xla(monkeypatch, name, shrink):
    """A tiny Gated DeltaNet, and a tiny Titans LMM with a linear and with an MLP memory (momentum
    and weight decay), 1 layer, chunks of 8 over 12 tokens (padding and two chunks for the Gated
    DeltaNet) or 16, with the Pallas kernels has the loss and parameter gradients of the XLA form."""
    calls = []
    kernel_path = pallas_chunked.memory_chunked_pallas
    monkeypatch.setattr(
        pallas_chunked, "memory_chunked_pallas", lambda *a, **kw: calls.append(1) or kernel_path(*a, **kw)
    )
    from experiments import configs

    seed = fresh_seed()
    cfg = configs.load(name).model
    section, field = shrink(cfg)
    length = 13 if name == "gated_deltanet_tiny" else 17  # Titans runs whole chunks
    tokens = jax.random.randint(jax.random.key(seed), (2, length), 0, cfg.vocab_size)
    model = build_model(cfg, nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)

    def loss_and_grad(impl):
        section[field] = impl
        gdef = nnx.graphdef(build_model(cfg, nnx.Rngs(0)))  # same parameter tree, the other impl

        def loss(p):
            logits = nnx.merge(gdef, p)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        return jax.value_and_grad(loss)(params)

    assert section[field] == "xla"  # the default
    loss_x, g_x = loss_and_grad("xla")
    assert not calls
    loss_p, g_p = loss_and_grad("pallas")
    assert calls  # the kernel ran
    assert rel_err(loss_p, loss_x) < 1e-6, seed
    assert max_grad_err(g_p, g_x) < TOL, seed
    assert max_tree_rel_err(g_p, g_x) < 1e-3, seed


def test_memora_refuses_the_kernels():
    from experiments import configs

    cfg = configs.load("memora_tiny").model
    cfg.titans.memory.impl = "pallas"
    with pytest.raises(ValueError, match="memora runs its own chunked form"):
        build_model(cfg, nnx.Rngs(0))


def test_kernel_under_a_mesh_runs_per_device_and_equals_xla_chunked():
    """With a mesh set, the kernel runs under a shard_map over the batch and head axes (Mosaic does
    not partition a kernel itself); outputs, final states and gradients equal the XLA form (the
    self-modifying rule on an MLP memory: momentum and DGD, four state matrices)."""
    seed = fresh_seed()
    shape = (4, 8, 2, 4, 4, 4)  # batch over data x fsdp (4), heads over tensor (2)
    spec, ws, q, k, v, rates = _inputs(seed, shape, "mlp", "l2", True, True, True)
    cot_y, cot_ws = _cotangents(seed, v, ws)
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    mesh = make_mesh({f"ici_{a}_parallelism": n for a, n in sizes.items()}, jax.devices()[:8])
    grad = {
        impl: jax.jit(jax.grad(_loss(impl, spec, 4, "post_update", cot_y, cot_ws), range(5), has_aux=True))
        for impl in ops.IMPLS
    }
    with jax.set_mesh(mesh):
        g, (y, s) = grad["pallas"](ws, q, k, v, rates)
        text = grad["pallas"].lower(ws, q, k, v, rates).as_text()
    g_ref, (y_ref, s_ref) = grad["xla"](ws, q, k, v, rates)
    assert "shard_map" in text or "manual" in text  # the kernel ran per device
    assert rel_err(y, y_ref) < TOL, seed
    assert max_tree_rel_err(s.weights, s_ref.weights) < TOL, seed
    assert max_tree_rel_err(s.momentum, s_ref.momentum) < TOL, seed
    assert max_grad_err(g, g_ref) < TOL, seed


@pytest.mark.parametrize("structure", ["linear", "mlp"])
def test_kernel_follows_the_lowering_platform(structure):
    """interpret=None: the same jitted call lowers to the interpreted kernel (plain HLO) for CPU, to
    a Mosaic custom call for TPU and to a Triton custom call (the loop layout) for GPU, so an AOT
    compile from a CPU host gets the compiled kernel; forward and backward, with momentum and DGD.
    Widths of 16: Triton's smallest matmul. The Triton call carries `TRITON_PARAMS`."""
    spec, ws, q, k, v, rates = _inputs(0, (1, 32, 1, 16, 16, 16), structure, "l2", True, True, True)

    def f(ws, q, k, v, rates):
        y, s = ops.memory_chunked(spec, _state(ws), q, k, v, rates, chunk_size=16, impl="pallas")
        return y, s.weights

    def loss(*args):
        y, w = f(*args)
        return jnp.sum(y) + sum(jnp.sum(x) for x in w)

    for fn in (f, jax.grad(loss)):
        traced = jax.jit(fn).trace(ws, q, k, v, rates)
        text = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "tpu", "cuda")}
        assert "tpu_custom_call" in text["tpu"] and "triton" not in text["tpu"]
        assert "xla.gpu.triton" in text["cuda"] and "tpu_custom_call" not in text["cuda"]
        for name, value in pallas_chunked.TRITON_PARAMS.items():  # the launch parameters reach Triton
            assert f"{name} = {value} : i32" in text["cuda"]
        assert "tpu_custom_call" not in text["cpu"] and "triton" not in text["cpu"]
