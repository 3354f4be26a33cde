"""The titans configs: exact parameter counts (shapes only), every variant reachable by an override,
and the family section the model reads."""

import pytest

from experiments import configs
from nl_jax.models import count_params
from nl_jax.models.titans import VARIANTS

# Exact counts (fix the table in the README if a config changes on purpose). Sized configs are LMM.
EXACT = {
    "titans_tiny": 1_030_400,
    "titans_340m": 342_575_616,
    "titans_760m": 760_754_688,
    "titans_1_3b": 1_291_752_448,
}
TINY_HYBRIDS = {"mac": 1_492_864, "mag": 1_361_152, "mal": 1_295_104}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_titans_configs_exact_param_counts(name):
    cfg = configs.load(name)
    assert cfg.model.name == "titans" and cfg.model.titans.variant == "lmm"
    assert count_params(cfg.model) == EXACT[name]  # jax.eval_shape: nothing is allocated


@pytest.mark.parametrize("variant", sorted(TINY_HYBRIDS))
def test_every_variant_is_reachable_by_an_override(variant):
    cfg = configs.load("titans_tiny")
    cfg.model.titans.variant = variant  # what --config.model.titans.variant=... does
    assert count_params(cfg.model) == TINY_HYBRIDS[variant]


def test_sized_configs_use_bfloat16_and_remat_and_tiny_is_byte_level():
    for name in ("titans_340m", "titans_760m", "titans_1_3b"):
        model = configs.load(name).model
        assert model.dtype == "bfloat16" and model.remat_policy != "none" and model.vocab_size == 32000
    tiny = configs.load("titans_tiny").model
    assert tiny.vocab_size == 260 and tiny.dtype == "float32"
    assert set(VARIANTS) == {"lmm", "mac", "mag", "mal"}
    assert "titans_base" not in configs.names()
