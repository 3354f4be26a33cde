"""Registry lookups, parameter counts from shapes only, and the named transformer configs."""

import importlib
import math

import jax
import pytest
from flax import nnx

from nl_jax.models import build_model, count_params, registered_models

SIZED = {"transformer_340m": 340e6, "transformer_760m": 760e6, "transformer_1_3b": 1.3e9}
# Exact counts (fix the table in the report / README if a config changes on purpose).
EXACT = {
    "transformer_340m": 341_099_520,
    "transformer_760m": 777_856_512,
    "transformer_1_3b": 1_326_548_992,
    "transformer_tiny": 919_680,
}


def _config(name):
    return importlib.import_module(f"experiments.configs.{name}").get_config()


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
def test_named_configs_param_counts(name):
    n = count_params(_config(name).model)  # jax.eval_shape: nothing is allocated
    assert n == EXACT[name]
    if name in SIZED:
        assert abs(n / SIZED[name] - 1) < 0.05, f"{name}: {n:,} is not within 5% of its name"


def test_configs_have_model_and_mesh_sections():
    for name in EXACT:
        cfg = _config(name)
        assert set(cfg.keys()) == {"model", "mesh"}
        assert cfg.model.name == "transformer"
