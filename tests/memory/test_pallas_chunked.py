"""The Pallas kernel of the chunked form (`memory_chunked(impl="pallas")`, run in interpret mode on
CPU) against the XLA chunked form: outputs, final states and gradients with respect to q, k, v,
every rate and the initial state, float32, to a relative error under 1e-5.

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
# (batch, length, heads, key width, value width, chunk): several chunks, one chunk, Dv != Dk, chunk 1
SHAPES = [(2, 16, 2, 8, 8, 4), (1, 8, 1, 4, 6, 8), (1, 6, 2, 6, 4, 3), (1, 3, 1, 4, 4, 1)]
# (objective, retention, dgd): the gated delta rule (dot + retention + dgd), DeltaNet (dot + dgd),
# linear attention with decay (dot + retention), the l2 rules with and without DGD
RULES = [
    ("dot", True, True),
    ("dot", False, True),
    ("dot", True, False),
    ("l2", True, False),
    ("l2", True, True),
]
CASES = [(shape, rule, ops.READ_MODES[i % 3]) for i, (shape, rule) in enumerate(zip(SHAPES * 2, RULES * 2))]


def _inputs(seed, shape, objective, retention, dgd):
    """Random inputs whose gates include exact 0s and 1s (a saturated gate reaches both in float32)."""
    b, t, h, dk, dv, _ = shape
    ks = jax.random.split(jax.random.key(seed), 8)
    q, k = unit(jax.random.normal(ks[0], (b, t, h, dk))), unit(jax.random.normal(ks[1], (b, t, h, dk)))
    v = jax.random.normal(ks[2], (b, t, h, dv))

    def gate(key, low):
        g = low + (1 - low) * jax.nn.sigmoid(jax.random.normal(key, (b, t, h)))
        pick = jax.random.randint(jax.random.fold_in(key, 1), (b, t, h), 0, 6)
        return jnp.where(pick == 0, 0.0, jnp.where(pick == 1, 1.0, g))

    rates = ops.Rates(
        lr=gate(ks[3], 0.0),
        retention=gate(ks[4], 0.5) if retention else None,
        dgd=gate(ks[5], 0.0) if dgd else None,
    )
    w0 = 0.3 * jax.random.normal(ks[6], (b, h, dv, dk))
    return ops.MemorySpec("linear", objective), w0, q, k, v, rates


def _loss(impl, spec, chunk, read, cot_y, cot_w):
    """A scalar of the outputs and the final state with fixed random cotangents."""

    def loss(w0, q, k, v, rates):
        state = ops.init_state(ops.LinearWeights(w0), momentum=False)
        y, s = ops.memory_chunked(spec, state, q, k, v, rates, chunk_size=chunk, read=read, impl=impl)
        return jnp.sum(y * cot_y) + jnp.sum(s.weights.w * cot_w), (y, s)

    return loss


@pytest.mark.parametrize("shape,rule,read", CASES)
def test_kernel_equals_xla_chunked(shape, rule, read):
    seed = fresh_seed()
    spec, w0, q, k, v, rates = _inputs(seed, shape, *rule)
    key = jax.random.key(seed + 1)
    cot_y, cot_w = jax.random.normal(key, v.shape), jax.random.normal(jax.random.fold_in(key, 1), w0.shape)
    args = (w0, q, k, v, rates)
    grads = {
        impl: jax.grad(_loss(impl, spec, shape[-1], read, cot_y, cot_w), range(5), has_aux=True)(*args)
        for impl in ops.IMPLS
    }
    g_ref, (y_ref, s_ref) = grads["xla"]
    g, (y, s) = grads["pallas"]
    assert rel_err(y, y_ref) < TOL, seed
    assert rel_err(s.weights.w, s_ref.weights.w) < TOL, seed
    assert int(s.step) == 0 and rel_err(s.boundary.w, s.weights.w) == 0
    assert max_grad_err(g, g_ref) < TOL, seed
    assert max_tree_rel_err(g, g_ref) < 1e-3, seed  # each leaf on its own (see max_grad_err)


def test_kernel_equals_naive_gated_delta_rule():
    """The kernel against the token-by-token reference too, through the gated delta rule preset."""
    seed = fresh_seed()
    _, w0, q, k, v, rates = _inputs(seed, (1, 8, 2, 4, 4, 4), "dot", True, True)
    m = presets.gated_delta_rule(rates.retention, rates.lr)
    state = ops.init_state(ops.LinearWeights(w0), momentum=False)
    y_ref, s_ref = ops.memory_naive(m.spec, state, q, k, v, m.rates, chunk_size=1, read=m.read)
    y, s = ops.memory_chunked(m.spec, state, q, k, v, m.rates, chunk_size=4, read=m.read, impl="pallas")
    assert rel_err(y, y_ref) < TOL, seed
    assert rel_err(s.weights.w, s_ref.weights.w) < TOL, seed


def test_unsupported_spec_raises_one_clear_error():
    spec = ops.MemorySpec("mlp", "l2", bias=True)
    weights = ops.init_weights(spec, jax.random.key(0), (1, 1), 4, hidden=4)
    state = ops.init_state(weights, momentum=True)
    x = jnp.ones((1, 4, 1, 4))
    rates = ops.Rates(lr=jnp.ones((1, 4, 1)), momentum=jnp.ones((1, 4, 1)))
    with pytest.raises(ValueError, match=r"structure='mlp', bias=True, momentum: use impl='xla'"):
        ops.memory_chunked(spec, state, x, x, x, rates, chunk_size=4, impl="pallas")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.memory_chunked(spec, state, x, x, x, rates, chunk_size=4, impl="triton")


def test_unsupported_lists_nothing_for_the_gated_delta_rule():
    m = presets.gated_delta_rule(jnp.ones((1, 4, 1)), jnp.ones((1, 4, 1)))
    state = ops.init_state(ops.LinearWeights(jnp.zeros((1, 1, 4, 4))), momentum=False)
    assert pallas_chunked.unsupported(m.spec, state, m.rates, None) == []


def test_gated_deltanet_model_pallas_equals_xla(monkeypatch):
    """A tiny Gated DeltaNet (1 layer, chunks of 8 over 12 tokens: padding and two chunks) with
    memory_impl='pallas' has the loss and parameter gradients of memory_impl='xla'."""
    calls = []
    kernel_path = pallas_chunked.memory_chunked_pallas
    monkeypatch.setattr(
        pallas_chunked, "memory_chunked_pallas", lambda *a, **kw: calls.append(1) or kernel_path(*a, **kw)
    )
    from experiments import configs

    seed = fresh_seed()
    cfg = configs.load("gated_deltanet_tiny").model
    cfg.update(num_layers=1, chunk_size=8, d_model=32, num_heads=2, head_dim=8, mlp_hidden=32)
    tokens = jax.random.randint(jax.random.key(seed), (2, 13), 0, cfg.vocab_size)
    model = build_model(cfg, nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)

    def loss_and_grad(impl):
        cfg.memory_impl = impl
        gdef = nnx.graphdef(build_model(cfg, nnx.Rngs(0)))  # same parameter tree, the other impl

        def loss(p):
            logits = nnx.merge(gdef, p)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        return jax.value_and_grad(loss)(params)

    assert cfg.memory_impl == "xla"  # the default
    loss_x, g_x = loss_and_grad("xla")
    assert not calls
    loss_p, g_p = loss_and_grad("pallas")
    assert calls  # the kernel ran
    assert rel_err(loss_p, loss_x) < 1e-6, seed
    assert max_grad_err(g_p, g_x) < TOL, seed
    assert max_tree_rel_err(g_p, g_x) < 1e-3, seed


def test_kernel_under_a_mesh_runs_per_device_and_equals_xla_chunked():
    """With a mesh set, the kernel runs under a shard_map over the batch and head axes (Mosaic does
    not partition a kernel itself); outputs, final state and gradients equal the XLA form."""
    seed = fresh_seed()
    shape = (4, 8, 2, 4, 4, 4)  # batch over data x fsdp (4), heads over tensor (2)
    spec, w0, q, k, v, rates = _inputs(seed, shape, "dot", True, True)
    key = jax.random.key(seed + 1)
    cot_y, cot_w = jax.random.normal(key, v.shape), jax.random.normal(jax.random.fold_in(key, 1), w0.shape)
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    mesh = make_mesh({f"ici_{a}_parallelism": n for a, n in sizes.items()}, jax.devices()[:8])
    grad = {
        impl: jax.jit(jax.grad(_loss(impl, spec, 4, "boundary", cot_y, cot_w), range(5), has_aux=True))
        for impl in ops.IMPLS
    }
    with jax.set_mesh(mesh):
        g, (y, s) = grad["pallas"](w0, q, k, v, rates)
        text = grad["pallas"].lower(w0, q, k, v, rates).as_text()
    g_ref, (y_ref, s_ref) = grad["xla"](w0, q, k, v, rates)
    assert "shard_map" in text or "manual" in text  # the kernel ran per device
    assert rel_err(y, y_ref) < TOL, seed
    assert rel_err(s.weights.w, s_ref.weights.w) < TOL, seed
    assert max_grad_err(g, g_ref) < TOL, seed


def test_interpret_mode_follows_the_lowering_platform():
    """interpret=None: the same jitted call lowers to the interpreted kernel (plain HLO) for CPU and
    to a Mosaic custom call for TPU, so an AOT compile for TPU from a CPU host gets the kernel."""
    spec, w0, q, k, v, rates = _inputs(0, (1, 8, 1, 4, 4, 4), "dot", True, True)

    def f(w0, q, k, v, rates):
        state = ops.init_state(ops.LinearWeights(w0), momentum=False)
        return ops.memory_chunked(spec, state, q, k, v, rates, chunk_size=4, impl="pallas")[0]

    traced = jax.jit(f).trace(w0, q, k, v, rates)
    for_tpu = traced.lower(lowering_platforms=("tpu",)).as_text()
    for_cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert "tpu_custom_call" in for_tpu
    assert "tpu_custom_call" not in for_cpu
