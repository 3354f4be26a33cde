"""The startup banner: versions, devices, mesh, parameter count, FLOPs, the sharding table."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import jax

_PACKAGES = ("nl_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "ml-collections")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def banner(
    *,
    config_name: str,
    workdir: str,
    mesh,
    param_count: int,
    flops_per_token: float,
    flops_source: str,
    peak: float | None,
    tokens_per_step: int,
    total_steps: int,
    table: str,
    max_table_lines: int = 60,
) -> str:
    dev = jax.devices()[0]
    lines = [
        "=" * 78,
        f"nl_jax pretrain: config {config_name}   workdir {workdir}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"devices: {jax.device_count()} x {dev.device_kind} ({dev.platform}) over "
        f"{jax.process_count()} process(es); this is process {jax.process_index()}",
        "host malloc: GLIBC_TUNABLES=" + (os.environ.get("GLIBC_TUNABLES") or "(unset: glibc's defaults)"),
        "mesh: " + ", ".join(f"{k}={v}" for k, v in mesh.shape.items()),
        f"parameters: {param_count:,}",
        f"train FLOPs/token: {flops_per_token:.4g} ({flops_source}); peak/device: "
        + (f"{peak:.4g} FLOP/s" if peak else "unknown (no MFU)"),
        f"tokens/step: {tokens_per_step:,}; steps: {total_steps:,}; total tokens: "
        f"{tokens_per_step * total_steps:,}",
        "sharding:",
    ]
    table_lines = table.splitlines()
    if len(table_lines) > max_table_lines:
        hidden = len(table_lines) - max_table_lines
        table_lines = table_lines[:max_table_lines] + [f"... ({hidden} more rows)"]
    lines += ["  " + t for t in table_lines]
    lines.append("=" * 78)
    return "\n".join(lines)
