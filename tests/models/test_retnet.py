"""RetNet: multi-scale retention through the memory core (checks in tests/models/linear_model_checks.py)."""

import numpy as np
import pytest
from flax import nnx

from experiments import configs
from nl_jax.mixers.linear import retention_decays
from nl_jax.models import build_model, count_params
from tests.models import linear_model_checks as checks

NAME = "retnet"


@pytest.fixture(scope="module")
def bench():
    return checks.Bench(NAME)


def test_causality_and_decode_equals_chunked_forward(bench):
    checks.check_causality_and_decode(bench)


def test_chunked_equals_naive_loss_and_grads(bench):
    checks.check_chunked_equals_naive(bench)


def test_layer_is_textbook_retention(bench):
    checks.check_mixer_is_textbook(bench)
    np.testing.assert_allclose(retention_decays(3), [1 - 2**-5, 1 - 2**-6, 1 - 2**-7])


def test_tiny_config_overfits(bench):
    checks.check_overfits(bench)


def test_odd_head_dim_with_rotary_is_rejected():
    with pytest.raises(ValueError, match="even head_dim"):
        build_model(checks.bench_cfg(NAME, head_dim=7), nnx.Rngs(0))


def test_forward_flops_per_token_matches_xla():
    checks.check_flops(NAME)


# Exact parameter counts of the named configs (the README table; update both if a shape changes).
EXACT = {
    "retnet_tiny": 985_728,
    "retnet_340m": 347_403_264,
    "retnet_760m": 777_868_800,
    "retnet_1_3b": 1_351_727_104,
}


@pytest.mark.parametrize("config_name", sorted(EXACT))
def test_config_parameter_counts(config_name):
    assert count_params(configs.load(config_name).model) == EXACT[config_name]
