"""Device mesh with axes ('data', 'fsdp', 'tensor') built from MaxText-style parallelism sizes.

`ici_*` sizes split the devices of one slice (fast interconnect), `dcn_*` sizes split the slices
(data-center network). In each group exactly one size may be -1 and is filled in so the product
matches the device count. The mesh uses Auto axis types: the shardings we hand to jit and the
logical constraints inside the model leave the rest to XLA's propagation (jax.make_mesh now
defaults to Explicit axes, which would require out_sharding on every ambiguous matmul).
"""

from collections.abc import Sequence
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def fill_parallelism(sizes: Sequence[int], total: int, group: str = "ici") -> tuple[int, ...]:
    """Replaces the single -1 in `sizes` so their product is `total`; errors name every number."""
    sizes = tuple(int(s) for s in sizes)
    named = ", ".join(f"{group}_{a}_parallelism={s}" for a, s in zip(MESH_AXES, sizes))
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"at most one {group} size may be -1, got {named}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"{group} sizes must be positive or -1, got {named}")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if total % known:
            raise ValueError(
                f"{named}: the known sizes multiply to {known}, which does not divide "
                f"the {total} {'slices' if group == 'dcn' else 'devices per slice'}"
            )
        sizes = tuple(total // known if s == -1 else s for s in sizes)
    elif known != total:
        raise ValueError(
            f"{named}: product {known} does not match the {total} "
            f"{'slices' if group == 'dcn' else 'devices per slice'}"
        )
    return sizes


def _num_slices(devices) -> int:
    return 1 + max(getattr(d, "slice_index", 0) or 0 for d in devices)


def mesh_shape_from_config(mesh_cfg, num_devices: int, num_slices: int = 1):
    """(ici sizes, dcn sizes) after filling the -1s; their product per axis is the mesh shape."""
    if num_devices % num_slices:
        raise ValueError(f"{num_devices} devices do not split evenly into {num_slices} slices")
    ici = fill_parallelism(
        [mesh_cfg[f"ici_{a}_parallelism"] for a in MESH_AXES], num_devices // num_slices, "ici"
    )
    dcn = fill_parallelism([mesh_cfg.get(f"dcn_{a}_parallelism", 1) for a in MESH_AXES], num_slices, "dcn")
    return ici, dcn


def device_grid(mesh_cfg, devices: Sequence[jax.Device]) -> np.ndarray:
    """Devices arranged as a (data, fsdp, tensor) array.

    On a single slice the order comes from mesh_utils.create_device_mesh (TPU-torus aware); on
    several slices (devices with a slice_index) from create_hybrid_device_mesh, so that only the
    dcn factor of each axis crosses slices.
    """
    devices = list(devices)
    ici, dcn = mesh_shape_from_config(mesh_cfg, len(devices), _num_slices(devices))
    if math.prod(dcn) > 1:
        return np.asarray(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices))
    return np.asarray(mesh_utils.create_device_mesh(ici, devices))


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over `devices` (default: all global devices) with axes MESH_AXES and Auto axis types."""
    grid = device_grid(mesh_cfg, jax.devices() if devices is None else devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
