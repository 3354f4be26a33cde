"""DLA, deep linear attention (nl_jax/models/dla.py): the Titans LMM shell with a Hebbian MLP memory
(`presets.deep_linear_attention`). Shared checks in tests/models/lmm_model_checks.py."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from experiments import configs
from nl_jax.models import build_model, count_params
from tests.memory.inputs import fresh_seed
from tests.models import lmm_model_checks as checks
from tests.models.test_document_boundaries import _jitted, assert_packed_equals_apart
from tests.models.test_document_restarts import ROWS4

NAME = "dla"


def test_causal_and_decoding_equals_the_chunked_forward():
    checks.check_causal_and_decode(NAME)


def test_chunked_equals_token_by_token_reference_loss_and_grads():
    checks.check_chunked_equals_naive(NAME)


def test_tiny_dla_overfits_a_fixed_batch():
    checks.check_overfits(NAME)


def test_reset_packed_documents_equal_their_documents_apart():
    """data.document_boundaries='reset' (as Titans LMM): documents on the chunk grid of 4."""
    seed = fresh_seed()
    model = build_model(checks.bench_cfg(NAME), nnx.Rngs(seed))
    assert_packed_equals_apart(_jitted(model), seed, checks.V, ROWS4)


def test_the_memory_is_hebbian_gd_on_an_mlp():
    """One layer's memory: the dot objective without momentum, the preset's spec and rates."""
    model = build_model(checks.bench_cfg(NAME), nnx.Rngs(0))
    memory = model.blocks.layers.memory
    assert (memory.spec.structure, memory.spec.objective, memory.momentum) == ("mlp", "dot", False)
    assert not hasattr(memory, "momentum_proj")  # no dead gate
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))
    graphdef, state = nnx.split(memory)
    layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    *_, rates, _ = layer._qkv_rates(x, layer.init_state(2).conv)
    assert rates.momentum is None and rates.retention is not None and bool(jnp.all(rates.lr > 0))


def test_bad_config_is_rejected_with_a_clear_error():
    cfg = checks.bench_cfg(NAME, objective="l2")
    with pytest.raises(ValueError, match=r"dla is the lmm memory with titans.memory.objective='dot'"):
        build_model(cfg, nnx.Rngs(0))
    cfg = checks.bench_cfg(NAME)
    cfg.titans.variant = "mac"
    with pytest.raises(ValueError, match=r"start from experiments/configs/dla_base.py"):
        build_model(cfg, nnx.Rngs(0))


def test_forward_flops_count_the_memory_inner_loop():
    checks.check_flops(NAME)


# Exact parameter counts of the named configs (the README table; update both if a shape changes).
EXACT = {
    "dla_tiny": 1_028_352,
    "dla_340m": 342_182_400,
    "dla_760m": 760_312_320,
    "dla_1_3b": 1_290_966_016,
}


@pytest.mark.parametrize("config_name", sorted(EXACT))
def test_config_parameter_counts(config_name):
    assert count_params(configs.load(config_name).model) == EXACT[config_name]
