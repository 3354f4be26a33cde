"""Registry lookups, parameter counts from shapes only, and the named configs."""

import math

import jax
import pytest
from flax import nnx

from experiments import configs
from nl_jax.models import build_model, count_params, registered_models

_SIZE_SUFFIXES = {"_340m": 340e6, "_760m": 760e6, "_1_3b": 1.3e9}
SIZED = {n: size for n in configs.names() for suffix, size in _SIZE_SUFFIXES.items() if n.endswith(suffix)}
# Exact counts (fix the table in the report / README if a config changes on purpose).
EXACT = {
    "transformer_340m": 341_099_520,
    "transformer_760m": 777_856_512,
    "transformer_1_3b": 1_326_548_992,
    "transformer_tiny": 919_680,
}


def _config(name):
    return configs.load(name)


def test_unknown_model_name_lists_close_matches(tiny_cfg):
    with pytest.raises(ValueError, match=r"unknown model name 'transfomer'.*'transformer'"):
        build_model(tiny_cfg(name="transfomer"), nnx.Rngs(0))
    assert "transformer" in registered_models()


def test_count_params_matches_the_built_model(tiny_cfg):
    cfg = tiny_cfg(tie_embeddings=True, num_kv_heads=2)
    model = build_model(cfg, nnx.Rngs(0))
    built = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    d, f, v, layers, kv_dim = 32, 64, 64, 3, 2 * 8
    by_hand = v * d + d + layers * (2 * d * d + 2 * d * kv_dim + 3 * d * f + 2 * d)
    assert count_params(cfg) == built == by_hand


@pytest.mark.parametrize("name", sorted(EXACT))
def test_transformer_configs_exact_param_counts(name):
    assert count_params(_config(name).model) == EXACT[name]  # jax.eval_shape: nothing is allocated


@pytest.mark.parametrize("name", sorted(SIZED))
def test_every_sized_config_is_within_5_percent_of_its_name(name):
    n = count_params(_config(name).model)
    assert abs(n / SIZED[name] - 1) < 0.05, f"{name}: {n:,} is not within 5% of its name"


def test_every_config_builds_a_registered_model():
    models = registered_models()
    for name in configs.names():
        assert _config(name).model.name in models, name


def test_unknown_config_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown config 'transfomer_tiny'.*transformer_tiny"):
        configs.load("transfomer_tiny")


def test_configs_have_model_and_mesh_sections():
    """Every named config has the sections the trainer reads (a family may add its own)."""
    sections = {"model", "mesh", "optim", "data", "train", "eval", "checkpoint"}
    for name in configs.names():
        cfg = _config(name)
        assert sections <= set(cfg.keys()), (name, sorted(cfg.keys()))
    for name in EXACT:
        assert _config(name).model.name == "transformer"
