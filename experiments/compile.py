r"""Compile the train step of a named config for a Cloud TPU slice, on any host (no TPU needed).

    python -m experiments.compile --config=hope_760m --topology=v5p-64
    python -m experiments.compile --config=hope_760m --topology=v5p-64 --config.model.remat_policy=full
    python -m experiments.compile --config=transformer_1_3b --topology=2xv5p-64 --save=/tmp/step.pkl
    python -m experiments.compile --config=hope_340m --topology=v5p-64 --markdown   # + a README table row

Prints per-device memory (arguments, outputs, temporaries, code) against the chip's HBM, XLA's and
the analytic FLOPs, the collectives and a roofline step time (compute-bound, rematerialisation
included) with the MFU it allows. Exit code 0 when the step fits in HBM, 1 when it does not; a
failure is one `error:` line with the codes of every command (experiments/cli.py): 2 a bad flag or
config (e.g. config.mesh not matching the slice, a --save directory that does not exist), 4 a --save
directory that cannot be written, 5 anything unexpected. --save is checked before compiling.
`--config` takes the same names, paths and `--config.a.b=v` overrides as experiments.pretrain.
Needs libtpu (`pip install -e ".[tpu]"`); run with JAX_PLATFORMS=cpu on a host without a TPU.
"""

import os
import sys

from absl import app, flags

from experiments import cli, config_flag, configs

_CONFIG = config_flag.define()

_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-64, v4-32, v5e-16, 2xv5p-64")
_SAVE = flags.DEFINE_string("save", None, "write the serialized executable to this path")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "also print the README table's header and this config's row")


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
    from nl_jax.train.aot import compile_for_slice

    report = compile_for_slice(config, _TOPOLOGY.value, save_path=_SAVE.value)
    print(f"config          {config_flag.name()} ({config.model.name})")
    print(report.format(), flush=True)
    if _SAVE.value and report.compiled is not None:
        print(f"saved           {_SAVE.value}")
    if _MARKDOWN.value:
        from nl_jax.train.aot import MARKDOWN_HEADER

        print(MARKDOWN_HEADER)
        print(report.markdown_row(config_flag.name()), flush=True)
    sys.exit(0 if report.fits else 1)


if __name__ == "__main__":
    cli.run(main)
