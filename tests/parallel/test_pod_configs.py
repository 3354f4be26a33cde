"""Every sized config's default mesh on a 32-chip slice (v5p-64, v4-64; README table): the mesh
fills the slice, the microbatch splits over its batch devices, and the weights are split within the
config's sharding tolerance. (Whether the step fits in HBM: `python -m experiments.compile`.)"""

import math

from flax import nnx
from jax.sharding import AbstractMesh

from experiments import configs
from nl_jax.models import build_model
from nl_jax.parallel import MESH_AXES, assert_params_sufficiently_sharded, mesh_shape_from_config

SIZED = [n for n in configs.names() if n.endswith(("_340m", "_760m", "_1_3b"))]


def test_sized_configs_split_over_32_chips():
    assert len(SIZED) >= 27
    for name in SIZED:
        config = configs.load(name)
        ici, dcn = mesh_shape_from_config(config.mesh, 32)
        shape = tuple(a * b for a, b in zip(ici, dcn))
        assert math.prod(shape) == 32, name
        micro = config.data.global_batch_size // config.train.grad_accum_steps
        assert micro * config.train.grad_accum_steps == config.data.global_batch_size, name
        assert micro % (shape[0] * shape[1]) == 0, (name, micro, shape)
        model = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
        mesh = AbstractMesh(shape, MESH_AXES)
        assert_params_sufficiently_sharded(model, mesh, config.mesh.sharding_tolerance)
