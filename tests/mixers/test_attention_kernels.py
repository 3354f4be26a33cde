"""The fused attention kernels (`nl_jax.mixers.attention_kernels`) against the einsum form of
attention.py: splash in Pallas interpret mode on CPU (outputs and gradients, float32), the cuDNN
path's arguments through jax.nn.dot_product_attention's XLA implementation, the sharded call and
the choice of interpret mode at lowering."""

import jax
import jax.numpy as jnp
import pytest

from nl_jax.mixers import attention_mask, dot_product_attention, segment_mask
from nl_jax.mixers.attention_kernels import check_impl, cudnn_attention, splash_attention
from nl_jax.parallel.mesh import make_mesh
from tests.memory.inputs import fresh_seed, max_grad_err, rel_err

TOL = 1e-5


def _inputs(seed, b, t, h, kvh, d=8, documents=False):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k, v = (jax.random.normal(kk, (b, t, kvh, d)) for kk in ks[1:3])
    seg = None
    if documents:  # documents of random lengths, the packed rows' segment ids
        starts = jax.random.bernoulli(ks[3], 0.08, (b, t)).at[:, 0].set(True)
        seg = jnp.cumsum(starts, axis=1).astype(jnp.int32)
    cot = jax.random.normal(ks[4], q.shape)
    return q, k, v, seg, cot


def _reference(q, k, v, seg, window):
    pos = jnp.arange(q.shape[1])
    mask = attention_mask(pos, pos, window)
    if seg is not None:
        mask = mask & segment_mask(seg, seg)
    return dot_product_attention(q, k, v, mask)


def _value_and_grad(fn, q, k, v, cot):
    return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cot), (0, 1, 2))(q, k, v)


@pytest.mark.parametrize(
    "t,h,kvh,window,documents",
    [(128, 2, 2, 0, False), (256, 4, 2, 0, True), (256, 2, 1, 48, False), (128, 2, 2, 16, True)],
)
def test_splash_equals_the_einsum_form(t, h, kvh, window, documents):
    seed = fresh_seed()
    q, k, v, seg, cot = _inputs(seed, 2, t, h, kvh, documents=documents)
    want = _value_and_grad(lambda q, k, v: _reference(q, k, v, seg, window), q, k, v, cot)
    splash = lambda q, k, v: splash_attention(q, k, v, seg, window=window, interpret=True)  # noqa: E731
    got = _value_and_grad(splash, q, k, v, cot)
    # the outputs themselves (the scalar <out, cot> cancels: 1.6e-5 of itself for seed 2073848395)
    assert rel_err(splash(q, k, v), _reference(q, k, v, seg, window)) < TOL, seed
    assert max_grad_err(got[1], want[1]) < TOL, seed


@pytest.mark.parametrize("window", [0, 8])
def test_cudnn_path_passes_the_same_mask(window):
    """The call cudnn_attention makes, run by jax.nn.dot_product_attention's XLA implementation."""
    seed = fresh_seed()
    q, k, v, _, _ = _inputs(seed, 2, 32, 4, 2)
    got = cudnn_attention(q, k, v, window=window, implementation="xla")
    assert rel_err(got, _reference(q, k, v, None, window)) < TOL, seed


def test_cudnn_refuses_a_cpu_and_segment_ids():
    q, k, v, seg, _ = _inputs(0, 1, 16, 2, 2, documents=True)
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs a GPU"):
        cudnn_attention(q, k, v)
    with pytest.raises(ValueError, match="does not take segment ids"):
        cudnn_attention(q, k, v, seg, implementation="xla")


def test_bad_impl_and_untileable_length_are_one_line_errors():
    with pytest.raises(ValueError, match=r"attention_impl must be one of \('xla', 'splash', 'cudnn'\)"):
        check_impl("flash")
    with pytest.raises(ValueError, match="seq_len 200 is not a multiple of it"):
        check_impl("splash", 200)


def test_splash_under_a_mesh_runs_per_device():
    """With a mesh set, splash runs in a shard_map over batch (data x fsdp) and heads (tensor)."""
    seed = fresh_seed()
    q, k, v, seg, cot = _inputs(seed, 4, 128, 4, 2, documents=True)
    mesh = make_mesh({"ici_data_parallelism": 2, "ici_fsdp_parallelism": 2, "ici_tensor_parallelism": 2})
    splash = lambda q, k, v: splash_attention(q, k, v, seg)  # noqa: E731
    fn = jax.jit(lambda q, k, v: (splash(q, k, v), _value_and_grad(splash, q, k, v, cot)[1]))
    with jax.set_mesh(mesh):
        got = fn(q, k, v)
        text = fn.lower(q, k, v).as_text()
    reference = lambda q, k, v: _reference(q, k, v, seg, 0)  # noqa: E731
    assert "shard_map" in text or "manual" in text
    # the outputs, not <out, cot>, which cancels: 8e-4 of itself for seed 432280681
    assert rel_err(got[0], reference(q, k, v)) < TOL, seed
    assert max_grad_err(got[1], _value_and_grad(reference, q, k, v, cot)[1]) < TOL, seed


def test_splash_interpret_mode_follows_the_lowering_platform():
    q, k, v, _, _ = _inputs(0, 1, 128, 2, 2)
    traced = jax.jit(lambda q, k, v: splash_attention(q, k, v)).trace(q, k, v)
    assert "tpu_custom_call" in traced.lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" not in traced.lower(lowering_platforms=("cpu",)).as_text()


@pytest.mark.parametrize("name", ["transformer_tiny", "hope_attention_tiny", "samba_tiny"])
def test_models_with_splash_give_the_einsum_models_logits(name):
    """`model.attention_impl=splash` changes how attention is computed, not what: same parameters,
    same logits."""
    from flax import nnx

    from experiments import configs
    from nl_jax.models import build_model

    seed = fresh_seed()
    cfg = configs.load(name).model
    cfg.num_layers = 2  # samba's least: a Mamba and an SWA layer
    tokens = jax.random.randint(jax.random.key(seed), (2, 128), 0, cfg.vocab_size)
    models = {}
    for impl in ("xla", "splash"):
        cfg.attention_impl = impl
        models[impl] = build_model(cfg, nnx.Rngs(seed))
    assert rel_err(models["splash"](tokens), models["xla"](tokens)) < TOL, seed


def test_titans_refuses_a_fused_kernel_by_name():
    from flax import nnx

    from experiments import configs
    from nl_jax.models import build_model

    cfg = configs.load("titans_tiny").model
    cfg.titans.variant, cfg.attention_impl = "mac", "splash"
    with pytest.raises(ValueError, match="titans attends over its persistent tokens with the einsum form"):
        build_model(cfg, nnx.Rngs(0))
