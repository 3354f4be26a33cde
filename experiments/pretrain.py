r"""Pretrain a model from a named config.

    python -m experiments.pretrain --config=transformer_tiny                       # laptop CPU
    python -m experiments.pretrain --config=hope_760m --workdir=gs://BUCKET/runs/hope_760m   # TPU pod
    python -m experiments.pretrain --config=transformer_tiny --config.train.steps=200 --config.optim.lr=1e-3

`--config=NAME` loads experiments/configs/NAME.py (a path to any config file works too);
`--config.a.b=v` overrides a field. Re-running the same command resumes from the newest
checkpoint in `--workdir` (default ./runs/NAME), data iterator included.

Multi-host: on Cloud TPU every worker runs the same command and `jax.distributed.initialize()`
finds the others by itself (`--distributed=auto`, the default, initialises whenever the
environment names a cluster). Elsewhere pass `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` (or the env vars NL_JAX_COORDINATOR_ADDRESS / NL_JAX_NUM_PROCESSES /
NL_JAX_PROCESS_ID).
"""

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from experiments import cli, config_flag, configs

_WORKDIR = flags.DEFINE_string("workdir", None, "output directory, local or gs:// (default: ./runs/NAME)")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "call jax.distributed.initialize (auto: when a cluster is set)",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("NL_JAX_COORDINATOR_ADDRESS"), "HOST:PORT of process 0"
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("NL_JAX_NUM_PROCESSES", 0)) or None, "number of processes"
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    int(os.environ["NL_JAX_PROCESS_ID"]) if "NL_JAX_PROCESS_ID" in os.environ else None,
    "this process",
)

# Environment variables that mean "this is one host of a multi-host job" (Cloud TPU, SLURM, MPI).
_CLUSTER_ENV = (
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
)


_CONFIG = config_flag.define()


def _check_processes() -> None:
    """The multi-process flags, checked before jax.distributed would wait for the other processes."""
    n, i = _NUM_PROCESSES.value, _PROCESS_ID.value
    if n is not None and n < 1:
        raise cli.CommandError(f"--num_processes={n} must be >= 1")
    if i is not None and (i < 0 or (n is not None and i >= n)):
        raise cli.CommandError(
            f"--process_id={i} must be in [0, --num_processes={n})"
            if n is not None
            else f"--process_id={i} must be >= 0 (and below --num_processes)"
        )
    if (n is not None or i is not None) and _COORDINATOR.value is None and _DISTRIBUTED.value != "off":
        if not any(os.environ.get(k) for k in _CLUSTER_ENV):
            raise cli.CommandError(
                "--num_processes / --process_id need --coordinator_address=HOST:PORT (process 0's "
                "address); on Cloud TPU, SLURM or MPI leave all three unset"
            )


def _init_distributed() -> None:
    import jax

    explicit = _COORDINATOR.value is not None
    mode = _DISTRIBUTED.value
    if mode == "off" or (
        mode == "auto" and not explicit and not any(os.environ.get(k) for k in _CLUSTER_ENV)
    ):
        return
    if explicit:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    else:
        jax.distributed.initialize()  # Cloud TPU / SLURM / MPI: the cluster is detected


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        raise app.UsageError(f"--config=NAME is required; names: {', '.join(configs.names())}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO; -v 0 shows it
    _check_processes()
    name = config_flag.name()
    workdir = cli.writable_dir(_WORKDIR.value or os.path.join("runs", name), "--workdir")
    _init_distributed()
    from nl_jax.train import run

    config = _CONFIG.value
    if "init" in config:  # a model initialised from a pretrained checkpoint
        from nl_jax.interop import stacking

        try:
            config = stacking.prepare_run(config, workdir)
        except (ValueError, FileNotFoundError) as e:
            raise cli.CommandError(str(e)) from None
    summary = run(config, workdir, config_name=name)
    if summary.get("preempted"):
        sys.exit(cli.PREEMPTED)  # as a scheduler expects from a preempted job


if __name__ == "__main__":
    import jax

    jax.config.config_with_absl()  # --jax_* flags (e.g. --jax_log_compiles) work too
    cli.run(main)
