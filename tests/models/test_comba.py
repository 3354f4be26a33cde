"""Comba: presets.comba through the memory core (checks in
tests/models/linear_model_checks.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import configs
from nl_jax.mixers.linear import LinearMixer
from nl_jax.models import build_model, count_params
from tests.memory.inputs import rel_err
from tests.models import linear_model_checks as checks

NAME = "comba"


@pytest.fixture(scope="module")
def bench():
    return checks.Bench(NAME)


def test_causality_and_decode_equals_chunked_forward(bench):
    checks.check_causality_and_decode(bench)


def test_chunked_equals_naive_loss_and_grads(bench):
    checks.check_chunked_equals_naive(bench)


def test_layer_is_textbook_comba(bench):
    checks.check_mixer_is_textbook(bench)


def test_gate_initialisation_follows_mamba2(bench):
    """A = exp(A_log) in (0, 16], dt = softplus(dt_bias) in [1e-3, 1e-1]: alpha starts in (0, 1)."""
    attn = bench.model.blocks.layers.attn
    a = np.exp(np.asarray(attn.A_log[...]))
    dt = np.asarray(jax.nn.softplus(attn.dt_bias[...]))
    assert np.all((a > 0) & (a <= 16)) and np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5)))


def test_state_feedback_and_output_correction_start_as_fla(bench):
    """lambda_h = 1 (p = sigmoid(1) k) and d_h = 1 at init; the output gate is a sigmoid."""
    assert bench.cfg.output_gate_act == "sigmoid" and bench.cfg.correction_factor == 1.0
    attn = build_model(bench.cfg, nnx.Rngs(0)).blocks.layers.attn
    np.testing.assert_array_equal(attn.inner_decay[...], 1.0)
    np.testing.assert_array_equal(attn.correction[...], 1.0)


def test_without_feedback_it_is_gated_deltanet(bench):
    """With p = k (sigmoid(40) = 1 in float32), d = 0 and a SiLU gate, Comba's mixer is Gated
    DeltaNet's with the same parameters: the feedback terms are the only difference."""
    comba = checks.first_mixer(bench.model)
    comba.inner_decay[...] = jnp.full_like(comba.inner_decay[...], 40.0)
    comba.correction[...] = jnp.zeros_like(comba.correction[...])
    comba.s = dataclasses.replace(comba.s, output_gate_act="silu")
    settings = dataclasses.replace(comba.s, mechanism="gated_delta_rule")
    gdn = LinearMixer(bench.cfg.d_model, settings, rngs=nnx.Rngs(0))
    for name in ("q_proj", "k_proj", "v_proj", "q_conv", "k_conv", "v_conv", "b_proj", "a_proj", "g_proj"):
        getattr(gdn, name).kernel[...] = getattr(comba, name).kernel[...]
    gdn.o_proj.kernel[...] = comba.o_proj.kernel[...]
    gdn.A_log[...], gdn.dt_bias[...] = comba.A_log[...], comba.dt_bias[...]
    gdn.o_norm.scale[...] = comba.o_norm.scale[...]
    x = jax.random.normal(jax.random.key(bench.seed), (2, 12, bench.cfg.d_model))
    np.testing.assert_allclose(comba(x)[0], gdn(x)[0], rtol=1e-5, atol=1e-6, err_msg=f"seed {bench.seed}")
    comba.correction[...] = jnp.ones_like(comba.correction[...])  # and the correction does matter
    assert rel_err(comba(x)[0], gdn(x)[0]) > 1e-3, bench.seed


def test_tiny_config_overfits(bench):
    checks.check_overfits(bench)


def test_bfloat16_compute_keeps_float32_params_logits_and_state(bench):
    checks.check_bfloat16(bench)
    assert bench.model.init_decode_state(1).memory.dtype == jnp.float32


def test_forward_flops_per_token_matches_xla():
    checks.check_flops(NAME)


# Exact parameter counts of the named configs (the README table; update both if a shape changes).
EXACT = {
    "comba_tiny": 1_059_360,
    "comba_340m": 346_996_476,
    "comba_760m": 743_633_784,
    "comba_1_3b": 1_321_812_984,
}


@pytest.mark.parametrize("config_name", sorted(EXACT))
def test_config_parameter_counts(config_name):
    assert count_params(configs.load(config_name).model) == EXACT[config_name]
