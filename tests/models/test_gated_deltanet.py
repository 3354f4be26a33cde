"""Gated DeltaNet: the gated delta rule through the memory core (checks in
tests/models/linear_model_checks.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configs
from nl_jax.models import count_params
from tests.models import linear_model_checks as checks

NAME = "gated_deltanet"


@pytest.fixture(scope="module")
def bench():
    return checks.Bench(NAME)


def test_causality_and_decode_equals_chunked_forward(bench):
    checks.check_causality_and_decode(bench)


def test_chunked_equals_naive_loss_and_grads(bench):
    checks.check_chunked_equals_naive(bench)


def test_layer_is_textbook_gated_delta_rule(bench):
    checks.check_mixer_is_textbook(bench)


def test_gate_initialisation_follows_mamba2(bench):
    """A = exp(A_log) in (0, 16], dt = softplus(dt_bias) in [1e-3, 1e-1]: alpha starts in (0, 1)."""
    attn = bench.model.blocks.layers.attn
    a = np.exp(np.asarray(attn.A_log[...]))
    dt = np.asarray(jax.nn.softplus(attn.dt_bias[...]))
    assert np.all((a > 0) & (a <= 16)) and np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5)))


def test_tiny_config_overfits(bench):
    checks.check_overfits(bench)


def test_bfloat16_compute_keeps_float32_params_logits_and_state(bench):
    checks.check_bfloat16(bench)
    assert bench.model.init_decode_state(1).memory.dtype == jnp.float32


def test_forward_flops_per_token_matches_xla():
    checks.check_flops(NAME)


# Exact parameter counts of the named configs (the README table; update both if a shape changes).
EXACT = {
    "gated_deltanet_tiny": 1_059_344,
    "gated_deltanet_340m": 346_996_350,
    "gated_deltanet_760m": 743_633_532,
    "gated_deltanet_1_3b": 1_321_812_732,
}


@pytest.mark.parametrize("config_name", sorted(EXACT))
def test_config_parameter_counts(config_name):
    assert count_params(configs.load(config_name).model) == EXACT[config_name]
