"""Memora (nl_jax/models/memora.py): the Titans LMM shell with the KL-retention memory update of
nl_jax/memory/ops/memora.py. Shared checks in tests/models/lmm_model_checks.py; the update itself is
tested in tests/memory/test_ops_memora.py."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import configs
from nl_jax.models import build_model, count_params
from tests.memory.inputs import fresh_seed
from tests.models import lmm_model_checks as checks
from tests.models.test_document_boundaries import _jitted, assert_packed_equals_apart
from tests.models.test_document_restarts import ROWS4

NAME = "memora"


def test_causal_and_decoding_equals_the_chunked_forward_and_rows_stay_on_the_simplex():
    state = checks.check_causal_and_decode(NAME)  # 16 tokens: 4 whole chunks, at a boundary
    memory = state.memory  # stacked over layers: [L, B, H, O, I]
    assert int(memory.step[0]) == 0
    for w in memory.weights:
        assert float(jnp.min(w)) >= 0
        np.testing.assert_allclose(jnp.sum(w, -1), 1.0, rtol=1e-4)  # c = 1


def test_chunked_equals_token_by_token_reference_loss_and_grads():
    checks.check_chunked_equals_naive(NAME)


def test_tiny_memora_overfits_a_fixed_batch():
    checks.check_overfits(NAME)


def test_bad_config_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match=r"memora is the lmm memory with .*retention='kl'"):
        build_model(checks.bench_cfg(NAME, momentum=True), nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"simplex scale c must be > 0"):
        build_model(checks.bench_cfg(NAME, simplex_scale=0.0), nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"read='post_update'"):
        build_model(checks.bench_cfg(NAME, read="boundary"), nnx.Rngs(0))
    cfg = checks.bench_cfg(NAME)
    cfg.name = "titans"  # retention='kl' is only memora's lmm layout
    cfg.titans.variant = "mag"
    with pytest.raises(ValueError, match=r"retention='kl' \(Memora\) runs in the lmm variant"):
        build_model(cfg, nnx.Rngs(0))


def test_reset_packed_documents_equal_their_documents_apart():
    """data.document_boundaries='reset' (as Titans LMM): the memory restarts from its meta-learned
    initial logits at each document (on the chunk grid of 4), so packed rows equal documents apart."""
    seed = fresh_seed()
    model = build_model(checks.bench_cfg(NAME), nnx.Rngs(seed))
    assert_packed_equals_apart(_jitted(model), seed, checks.V, ROWS4)


def test_forward_flops_count_the_memory_inner_loop():
    checks.check_flops(NAME)


# Exact parameter counts of the named configs (the README table; update both if a shape changes).
EXACT = {
    "memora_tiny": 1_126_656,
    "memora_340m": 342_182_400,
    "memora_760m": 760_312_320,
    "memora_1_3b": 1_290_966_016,
}


@pytest.mark.parametrize("config_name", sorted(EXACT))
def test_config_parameter_counts(config_name):
    assert count_params(configs.load(config_name).model) == EXACT[config_name]
