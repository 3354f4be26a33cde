"""Cloud TPU slices by name ("v5p-64", "2xv4-64"): their chip, their torus, and abstract devices.

`topology_devices(name)` returns TPU devices of that slice without a TPU (libtpu from the `[tpu]`
extra describes them on a CPU host), so the real train step can be compiled ahead of time for a pod
and its memory and FLOPs read from the executable. The chip table holds the public per-chip
figures used for the fits / does-not-fit verdict and the roofline estimate.

Slice names follow Cloud TPU: v4-N and v5p-N count TensorCores (two per chip, one JAX device per
chip in megacore mode), v5e-N and v6e-N count chips. The torus shapes are those of the Cloud TPU
accelerator types (MaxText's accelerator_to_spec_map).
"""

from __future__ import annotations

import dataclasses
import re

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public per-chip figures (Cloud TPU system architecture pages)."""

    name: str
    hbm_bytes: int  # HBM capacity per JAX device (one chip)
    peak_bf16_flops: float  # dense bf16 matmul peak, FLOP/s
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s per chip, all links together, one direction


CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12, 300e9),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2.765e12, 600e9),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 8.19e11, 200e9),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12, 448e9),
}

# Chips per slice -> torus shape. v4 / v5p: 3D, wrapped in every dimension from 4x4x4 up.
_SHAPES_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    192: (4, 4, 12),
    256: (4, 8, 8),
    384: (4, 8, 12),
    512: (8, 8, 8),
    768: (8, 8, 12),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
}
# v5e / v6e: 2D; a side of 16 wraps.
_SHAPES_2D = {
    1: (1, 1),
    4: (2, 2),
    8: (2, 4),
    16: (4, 4),
    32: (4, 8),
    64: (8, 8),
    128: (8, 16),
    256: (16, 16),
}
_TOPOLOGY_PREFIX = {"v4": "v4", "v5p": "v5", "v5e": "v5e", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A named slice: generation, chips per slice, torus, number of slices (multislice over DCN)."""

    name: str
    generation: str
    chips: int
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def num_devices(self) -> int:
        return self.chips * self.num_slices

    @property
    def topology_name(self) -> str:
        return f"{_TOPOLOGY_PREFIX[self.generation]}:{'x'.join(map(str, self.shape))}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        if len(self.shape) == 3:
            return (min(self.shape) >= 4,) * 3
        return (self.shape[0] == 16, self.shape[1] == 16, False)


def parse_slice(name: str) -> Slice:
    """'v5p-64' -> Slice; 'NxGEN-SIZE' (e.g. '2xv5p-64') is N slices joined over DCN."""
    m = re.fullmatch(r"(?:(\d+)x)?(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise ValueError(
            f"unknown TPU slice {name!r}: expected GEN-SIZE with GEN one of {sorted(CHIPS)} "
            "(e.g. v5p-64, v4-32, v5e-16, v6e-8), optionally prefixed by a slice count ('2xv5p-64')"
        )
    num_slices, gen, size = int(m.group(1) or 1), m.group(2), int(m.group(3))
    cores_per_chip = 2 if gen in ("v4", "v5p") else 1
    if size % cores_per_chip:
        raise ValueError(f"{name}: {gen} sizes count TensorCores (2 per chip), so they are even")
    chips = size // cores_per_chip
    shapes = _SHAPES_3D if gen in ("v4", "v5p") else _SHAPES_2D
    if chips not in shapes:
        valid = ", ".join(f"{gen}-{c * cores_per_chip}" for c in sorted(shapes))
        raise ValueError(f"{name}: no {gen} slice with {chips} chips; known sizes: {valid}")
    if num_slices < 1:
        raise ValueError(f"{name}: the slice count must be at least 1")
    return Slice(name, gen, chips, shapes[chips], num_slices)


def topology_devices(slice_: Slice | str):
    """Abstract TPU devices of the slice(s), for ahead-of-time compilation on any host.

    Needs libtpu (`pip install -e ".[tpu]"`); multislice devices carry their slice_index, which
    nl_jax.parallel.make_mesh uses to put the dcn_* axes across slices.
    """
    from jax.experimental.topologies import get_topology_desc  # imported late: loads libtpu

    s = parse_slice(slice_) if isinstance(slice_, str) else slice_
    try:
        desc = get_topology_desc(
            platform="tpu",
            topology_name=s.topology_name,
            chip_config_name="megacore" if s.generation in ("v4", "v5p") else "default",
            chips_per_host_bounds=(2, 2, 1),
            num_slices=s.num_slices,
            wrap=s.wrap,
        )
    except RuntimeError as e:
        if "TPU support not installed" in str(e) or "libtpu" in str(e).lower():
            raise RuntimeError(
                f"{e}\nAhead-of-time TPU compilation needs libtpu: pip install -e '.[tpu]'"
            ) from e
        raise
    devices = list(desc.devices)
    if len(devices) != s.num_devices:
        raise RuntimeError(f"{s.name}: libtpu described {len(devices)} devices, expected {s.num_devices}")
    return devices
