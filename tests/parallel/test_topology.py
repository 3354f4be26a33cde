"""TPU slice names, and ahead-of-time compilation for a TPU topology on this CPU host (libtpu)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nl_jax.parallel import make_mesh
from nl_jax.parallel.topology import CHIPS, parse_slice, topology_devices


@pytest.mark.parametrize(
    "name, chips, topology, wrap",
    [
        ("v5p-64", 32, "v5:2x4x4", (False, False, False)),
        ("v5p-256", 128, "v5:4x4x8", (True, True, True)),
        ("v4-64", 32, "v4:2x4x4", (False, False, False)),
        ("v4-8", 4, "v4:2x2x1", (False, False, False)),
        ("v5e-16", 16, "v5e:4x4", (False, False, False)),
        ("v6e-256", 256, "v6e:16x16", (True, True, False)),
    ],
)
def test_slice_names_follow_cloud_tpu(name, chips, topology, wrap):
    s = parse_slice(name)
    assert (s.chips, s.topology_name, s.wrap, s.num_slices) == (chips, topology, wrap, 1)


def test_multislice_name():
    s = parse_slice("2xv5p-64")
    assert (s.chips, s.num_slices, s.num_devices) == (32, 2, 64)
    assert s.chip is CHIPS["v5p"]


@pytest.mark.parametrize(
    "bad, match",
    [
        ("v5p-65", "even"),
        ("v5p-48", "no v5p slice with 24 chips"),
        ("v7-8", "unknown TPU slice"),
        ("tpu", "GEN-SIZE"),
    ],
)
def test_bad_slice_names_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_slice(bad)


def test_aot_compile_for_a_tpu_topology_reports_hand_counted_memory_and_flops():
    devices = topology_devices("v5e-4")
    assert len(devices) == 4 and "TPU" in devices[0].device_kind
    mesh = make_mesh(
        dict(ici_data_parallelism=1, ici_fsdp_parallelism=2, ici_tensor_parallelism=2), devices=devices
    )
    m, k, n = 256, 512, 128
    f = jax.jit(
        lambda a, b: a @ b,
        in_shardings=(NamedSharding(mesh, P("fsdp", None)), NamedSharding(mesh, P(None, "tensor"))),
        out_shardings=NamedSharding(mesh, P("fsdp", "tensor")),
    )
    compiled = f.lower(
        jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32)
    ).compile()
    mem = compiled.memory_analysis()
    # Per device: half the rows of a, half the columns of b, a quarter of the output (float32).
    assert mem.argument_size_in_bytes == 4 * (m * k // 2 + k * n // 2)
    assert mem.output_size_in_bytes == 4 * m * n // 4
    assert compiled.cost_analysis()["flops"] == pytest.approx(2 * m * k * n / 4)
