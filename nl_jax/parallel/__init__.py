"""One code path from a laptop to a pod: a mesh from ici/dcn sizes, one logical-axis rules table."""

from nl_jax.parallel.mesh import MESH_AXES, device_grid, fill_parallelism, make_mesh, mesh_shape_from_config
from nl_jax.parallel.rules import (
    LOGICAL_AXIS_RULES,
    assert_params_sufficiently_sharded,
    constrain,
    constrain_batch,
    init_sharded,
    logical_to_spec,
    sharding_table,
    state_shardings,
)

__all__ = [
    "MESH_AXES",
    "device_grid",
    "fill_parallelism",
    "make_mesh",
    "mesh_shape_from_config",
    "LOGICAL_AXIS_RULES",
    "assert_params_sufficiently_sharded",
    "constrain",
    "constrain_batch",
    "init_sharded",
    "logical_to_spec",
    "sharding_table",
    "state_shardings",
]
