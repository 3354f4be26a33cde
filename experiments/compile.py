r"""Compile the train step of a named config for a Cloud TPU slice, on any host (no TPU needed).

    python -m experiments.compile --config=hope_760m --topology=v5p-64
    python -m experiments.compile --config=hope_760m --topology=v5p-64 --config.model.remat_policy=full
    python -m experiments.compile --config=transformer_1_3b --topology=2xv5p-64 --save=/tmp/step.pkl
    python -m experiments.compile --config=hope_340m --topology=v5p-64 --markdown   # + a README table row
    python -m experiments.compile --config=hope_760m --topology=v5p-64 --analytic   # projection, no compile

Prints per-device memory (arguments, outputs, temporaries, code) against the chip's HBM, XLA's and
the analytic FLOPs, the collectives, and the projected step time and tokens/s of
`nl_jax.train.projection` (the matmuls' rows against the MXU, the segment scan, the sequences per
device that memory allows, the collectives per segment, the executed op count from the compiled
HLO), next to the analytic projection of the Transformer++ of the same size (`transformer_760m`
for `hope_760m`, named by the config's size suffix). `--analytic` prints the projection alone from
the config, in seconds, with the op count estimated from the kernels per matmul of compiled HOPE steps
and nothing compiled.
Exit code 0 when the step fits in HBM, 1 when it does not; a
failure is one `error:` line with the codes of every command (experiments/cli.py): 2 a bad flag or
config (e.g. config.mesh not matching the slice, a --save directory that does not exist), 4 a --save
directory that cannot be written, 5 anything unexpected. --save is checked before compiling.
`--config` takes the same names, paths and `--config.a.b=v` overrides as experiments.pretrain.
Needs libtpu (`pip install -e ".[tpu]"`); run with JAX_PLATFORMS=cpu on a host without a TPU.
"""

import os
import re
import sys

from absl import app, flags

from experiments import cli, config_flag, configs

_CONFIG = config_flag.define()

_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-64, v4-32, v5e-16, 2xv5p-64")
_SAVE = flags.DEFINE_string("save", None, "write the serialized executable to this path")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "also print the README table's header and this config's row")
_ANALYTIC = flags.DEFINE_bool(
    "analytic", False, "print the projection from the config alone, without compiling"
)


def _baseline(name: str, slice_name: str):
    """(name, analytic projection) of the Transformer++ of the config's size, or None."""
    from nl_jax.parallel.topology import parse_slice
    from nl_jax.train import projection

    size = re.search(r"_(\d+m|\d+_\d+b|\d+b)$", name or "")
    baseline = f"transformer_{size.group(1)}" if size else ""
    if not size or baseline == name or baseline not in configs.names():
        return None
    slice_ = parse_slice(slice_name)
    return baseline, projection.project(projection.workload(configs.load(baseline), slice_), slice_)


def _check_save_path(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise cli.CommandError(f"--save={path} is a directory: name the file to write")
    if not os.path.isdir(parent):
        raise cli.CommandError(f"--save={path}: the directory {parent} does not exist; create it first")
    cli.writable_dir(parent, "--save's directory")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError(f"--config=NAME is required; names: {', '.join(configs.names())}")
    if not _TOPOLOGY.value:
        raise app.UsageError("--topology is required, e.g. --topology=v5p-64")
    if _SAVE.value:  # before the compile, which takes minutes for the sized configs
        _check_save_path(_SAVE.value)
    baseline = _baseline(config_flag.name(), _TOPOLOGY.value)  # a ValueError is a bad topology
    print(f"config          {config_flag.name()} ({config.model.name})")
    if _ANALYTIC.value:
        from nl_jax.parallel.topology import parse_slice
        from nl_jax.train import projection

        slice_ = parse_slice(_TOPOLOGY.value)
        work = projection.workload(config, slice_)
        print("\n".join(projection.describe(projection.project(work, slice_), baseline)), flush=True)
        return
    from nl_jax.train.aot import compile_for_slice

    report = compile_for_slice(config, _TOPOLOGY.value, save_path=_SAVE.value)
    print(report.format(baseline), flush=True)
    if _SAVE.value and report.compiled is not None:
        print(f"saved           {_SAVE.value}")
    if _MARKDOWN.value:
        from nl_jax.train.aot import MARKDOWN_HEADER

        print(MARKDOWN_HEADER)
        print(report.markdown_row(config_flag.name(), baseline[1] if baseline else None), flush=True)
    sys.exit(0 if report.fits else 1)


if __name__ == "__main__":
    cli.run(main)
