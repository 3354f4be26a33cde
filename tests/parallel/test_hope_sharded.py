"""HOPE on 8 fake devices: the memory inits are sharded, and the checkpointed ntp forward (logits
and final fast state) equals the unsharded one. (Its gradient is checked against a brute-force
reference in tests/models/test_hope_ntp.py.)"""

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments.configs import base
from nl_jax.models import build_model
from nl_jax.parallel import init_sharded, make_mesh, state_shardings
from tests.models.test_hope_ntp import T, V, small_cfg


def _mesh():
    cfg = base.get_config().mesh
    cfg.update(ici_data_parallelism=2, ici_fsdp_parallelism=2, ici_tensor_parallelism=2)
    return make_mesh(cfg)


def test_hope_memory_inits_are_sharded():
    model = nnx.eval_shape(lambda: build_model(small_cfg("hope", num_layers=2), nnx.Rngs(0)))
    specs = state_shardings(nnx.state(model), _mesh())["blocks"]["layers"]["mixer"]
    for memory in ("memory_k", "memory_out"):  # (layers, heads, memory_out, memory_in)
        assert specs[memory]["init_w1"].get_value().spec == P(None, "tensor", "fsdp"), memory


def test_hope_attention_ntp_sharded_equals_unsharded():
    mesh = _mesh()
    make = lambda: build_model(small_cfg("hope_attention", num_layers=1, checkpoint_segments=2), nnx.Rngs(0))  # noqa: E731
    ref, model = make(), init_sharded(make, mesh)
    tokens = jax.random.randint(jax.random.key(0), (4, T), 0, V)
    forward = lambda m, t: m.forward_ntp(t)  # noqa: E731
    want = nnx.jit(forward)(ref, tokens)
    with jax.set_mesh(mesh):
        got = nnx.jit(forward)(model, tokens)
    mixer, cms = got[1]  # per-sequence states [L, B, ...] are split over the batch axes
    for state in (mixer[0], cms.levels[0]["weights"]["gate"]):
        assert state.sharding.spec[1] == ("data", "fsdp"), state.sharding.spec
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
