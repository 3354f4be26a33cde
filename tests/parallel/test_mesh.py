"""Mesh construction from ici/dcn sizes: filling -1, error messages, Auto axis types."""

import jax
import numpy as np
import ml_collections
import pytest
from jax.sharding import AxisType

from experiments.configs import base
from nl_jax.parallel import device_grid, fill_parallelism, make_mesh, mesh_shape_from_config


def _mesh_cfg(**kw):
    cfg = base.get_config().mesh
    cfg.update(kw)
    return cfg


def test_fill_parallelism():
    assert fill_parallelism([1, -1, 1], 8) == (1, 8, 1)
    assert fill_parallelism([2, -1, 2], 8) == (2, 2, 2)
    assert fill_parallelism([2, 2, 2], 8) == (2, 2, 2)


@pytest.mark.parametrize(
    "sizes,msg",
    [
        (
            [2, 3, 1],
            r"ici_data_parallelism=2, ici_fsdp_parallelism=3, ici_tensor_parallelism=1: "
            r"product 6 does not match the 8 devices per slice",
        ),
        ([3, -1, 1], r"known sizes multiply to 3, which does not divide the 8 devices"),
        ([-1, -1, 1], r"at most one ici size may be -1"),
        ([0, -1, 1], r"positive or -1"),
    ],
)
def test_fill_parallelism_errors_name_the_sizes(sizes, msg):
    with pytest.raises(ValueError, match=msg):
        fill_parallelism(sizes, 8)


def test_default_mesh_is_all_fsdp_with_auto_axes():
    mesh = make_mesh(base.get_config().mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_mesh_2x2x2_and_mismatch_error():
    mesh = make_mesh(_mesh_cfg(ici_data_parallelism=2, ici_fsdp_parallelism=2, ici_tensor_parallelism=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="product 12 does not match the 8 devices"):
        make_mesh(_mesh_cfg(ici_data_parallelism=3, ici_fsdp_parallelism=2, ici_tensor_parallelism=2))
    # A subset of devices is a smaller mesh.
    assert dict(make_mesh(_mesh_cfg(), jax.devices()[:4]).shape)["fsdp"] == 4


def test_dcn_sizes_fill_against_slices():
    cfg = _mesh_cfg(ici_tensor_parallelism=4)
    ici, dcn = mesh_shape_from_config(cfg, num_devices=32, num_slices=4)
    assert ici == (1, 2, 4) and dcn == (4, 1, 1)  # dcn_data=-1 becomes the number of slices
    with pytest.raises(ValueError, match="dcn_fsdp_parallelism=2.*4 slices"):
        mesh_shape_from_config(_mesh_cfg(dcn_data_parallelism=1, dcn_fsdp_parallelism=2), 32, 4)
    plain = ml_collections.ConfigDict(
        dict(ici_data_parallelism=1, ici_fsdp_parallelism=-1, ici_tensor_parallelism=1)
    )  # dcn_* default to 1
    assert mesh_shape_from_config(plain, 8) == ((1, 8, 1), (1, 1, 1))


class _FakeDevice:
    """Stands in for a TPU device of a multi-slice job (only what the mesh code reads)."""

    platform, device_kind = "cpu", "fake"

    def __init__(self, i, per_slice):
        self.id, self.slice_index, self.process_index = i, i // per_slice, i // per_slice

    def __repr__(self):
        return f"D{self.id}/s{self.slice_index}"


def test_multislice_grid_puts_slices_on_the_dcn_axis():
    devices = [_FakeDevice(i, 4) for i in range(8)]  # 2 slices x 4 devices
    grid = device_grid(_mesh_cfg(ici_tensor_parallelism=2), devices)
    assert grid.shape == (2, 2, 2)  # data = dcn 2 slices, fsdp 2, tensor 2
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()  # only 'data' crosses slices
