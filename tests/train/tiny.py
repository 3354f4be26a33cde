"""A very small training setup shared by the trainer tests (2 layers x d32, 32-token windows)."""

import os
import subprocess
import sys

from experiments import configs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Every field here is also passed on the command line by `cli_args`, so subprocess runs of
# `python -m experiments.pretrain` train exactly what in-process runs train.
OVERRIDES = {
    "model.d_model": 32,
    "model.num_layers": 2,
    "model.num_heads": 2,
    "model.mlp_hidden": 64,
    "data.embedded_max_bytes": 300_000,
    "data.seq_len": 32,
    "data.global_batch_size": 8,
    "optim.lr": 3e-3,
    "optim.warmup_steps": 2,
    "train.steps": 12,
    "train.log_every": 2,
    "eval.every": 6,
    "eval.max_batches": 2,
    "checkpoint.every": 4,
}


def tiny_config(**overrides):
    """transformer_tiny shrunk by OVERRIDES, then `overrides` ("a.b" -> value, dots as "__")."""
    cfg = configs.load("transformer_tiny")
    for key, value in {**OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
        section, field = key.split(".", 1)
        cfg[section][field] = value
    return cfg


def cli_args(workdir, **overrides) -> list[str]:
    merged = {**OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return [
        sys.executable,
        "-m",
        "experiments.pretrain",
        "--config=transformer_tiny",
        f"--workdir={workdir}",
        "--jax_default_matmul_precision=highest",  # what tests/conftest.py sets in-process
        "--jax_disable_most_optimizations=true",  # what tests/train/conftest.py sets in-process
    ] + [f"--config.{k}={v}" for k, v in merged.items()]


def pretrain_env(device_count: int = 8) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
    return env


def run_cli(workdir, timeout=240, device_count=1, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_args(workdir, **overrides),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=pretrain_env(device_count),
    )


def start_cli(workdir, device_count=1, **overrides) -> subprocess.Popen:
    return subprocess.Popen(
        cli_args(workdir, **overrides),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=pretrain_env(device_count),
    )
