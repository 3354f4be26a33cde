"""The models' named parts (nl_jax.metrics.profiler.PARTS) reach the op names of the compiled
gradient, in the forward and in the backward, where benchmarks.step_profile reads them."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from experiments import configs
from nl_jax.metrics.profiler import in_outer_backward, part, part_of
from nl_jax.models import build_model
from nl_jax.train.state import ModelFn
from nl_jax.train.step import make_loss_fn


def _op_names(name: str) -> list[str]:
    cfg = configs.load(name).model
    cfg.update(num_layers=2)
    params = nnx.state(build_model(cfg, nnx.Rngs(0)), nnx.Param).to_pure_dict()
    batch = {"tokens": jnp.zeros((1, 33), jnp.int32)}
    step = jax.jit(jax.grad(make_loss_fn(ModelFn.from_config(cfg))))
    return re.findall(r'op_name="([^"]+)"', step.lower(params, batch).compile().as_text())


def _parts(names: list[str], backward: bool) -> set[str]:
    """The parts of the forward (with HOPE's inner backward) or of the outer backward."""
    return {part_of(n) for n in names if n.startswith("jit(") and in_outer_backward(n) == backward}


def test_hope_ntp_parts_forward_and_backward():
    names = _op_names("hope_tiny")  # segments of 16: two per row
    layer = {"mixer", "small_memories", "output_memory", "cms"}
    assert _parts(names, backward=False) >= layer | {"inner_backward", "cms_update"}
    assert _parts(names, backward=True) >= layer
    assert any("transpose(jvp(mixer))" in n for n in names)


def test_transformer_parts():
    names = _op_names("transformer_tiny")
    for backward in (False, True):
        assert _parts(names, backward) >= {"mixer", "mlp"}


def test_part_resolution_and_unknown_names():
    assert part_of("jit(loss_fn)/transpose(jvp(mixer))/while/body/cms/dot_general") == "mixer"
    assert part_of("jit(loss_fn)/jvp()/inner_backward/transpose(jvp(cms))/mul") == "inner_backward"
    assert part_of("jit(loss_fn)/jvp()/mixers/mul") == "other"  # components, not substrings
    with pytest.raises(ValueError, match="unknown model part 'attention'"):
        part("attention")
