"""DeltaNet: the delta rule through the memory core (checks in tests/models/linear_model_checks.py)."""

import jax.numpy as jnp
import pytest
from flax import nnx

from experiments import configs
from nl_jax.models import build_model, count_params
from tests.models import linear_model_checks as checks

NAME = "deltanet"


@pytest.fixture(scope="module")
def bench():
    return checks.Bench(NAME)


def test_causality_and_decode_equals_chunked_forward(bench):
    checks.check_causality_and_decode(bench)


def test_chunked_equals_naive_loss_and_grads(bench):
    checks.check_chunked_equals_naive(bench)


def test_layer_is_textbook_delta_rule(bench):
    checks.check_mixer_is_textbook(bench)


def test_tiny_config_overfits(bench):
    checks.check_overfits(bench)


def test_bad_settings_are_rejected(bench):
    with pytest.raises(ValueError, match="form must be one of"):
        bench.model(jnp.zeros((1, 4), jnp.int32), form="parallel")
    with pytest.raises(ValueError, match="qk_norm"):
        build_model(checks.bench_cfg(NAME, qk_norm="sum"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        build_model(checks.bench_cfg(NAME, num_heads=3), nnx.Rngs(0))


def test_forward_flops_per_token_matches_xla():
    checks.check_flops(NAME)


# Exact parameter counts of the named configs (the README table; update both if a shape changes).
EXACT = {
    "deltanet_tiny": 928_000,
    "deltanet_340m": 341_594_112,
    "deltanet_760m": 778_744_320,
    "deltanet_1_3b": 1_327_928_320,
}


@pytest.mark.parametrize("config_name", sorted(EXACT))
def test_config_parameter_counts(config_name):
    assert count_params(configs.load(config_name).model) == EXACT[config_name]
