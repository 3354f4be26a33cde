r"""Checkpoints between nl_jax and the Hugging Face layout (Llama: config.json + safetensors).

    python -m experiments.convert --from_hf=llama_dir --to=runs/llama            # import
    python -m experiments.convert --workdir=runs/llama --to_hf=llama_exported    # export

Import writes a workdir a run continues from: `config.json` (the `--config` given, default the
base config, with the model section read from the Hugging Face config.json) and a step-0
checkpoint holding only the parameters. Then

    python -m experiments.pretrain --config=runs/llama/config.json --workdir=runs/llama
    python -m experiments.evaluate --workdir=runs/llama --suite=lm

train it (fresh optimizer state, data from the start) or evaluate it. `--config.a.b=v` sets the
rest of the run at import time (data, optim, model.dtype ...), or later on the pretrain command
line for every field but the model's.

Export writes the newest (or `--step`) checkpoint of a `transformer` run's workdir as a
LlamaForCausalLM directory: config.json and model.safetensors, in the parameters' dtype.
"""

import os

from absl import app, flags
from absl import logging as absl_logging
from experiments import cli, config_flag

_FROM_HF = flags.DEFINE_string("from_hf", None, "import: a Hugging Face Llama directory")
_TO = flags.DEFINE_string("to", None, "import: the nl_jax workdir to write")
_WORKDIR = flags.DEFINE_string("workdir", None, "export: the nl_jax run to read")
_TO_HF = flags.DEFINE_string("to_hf", None, "export: the Hugging Face directory to write")
_STEP = flags.DEFINE_integer("step", None, "export: checkpoint step (default: the newest)", lower_bound=0)
_MAX_POSITIONS = flags.DEFINE_integer(
    "max_position_embeddings", 0, "export: written to config.json (0: the run's data.seq_len)", lower_bound=0
)
_CONFIG = config_flag.define(help_text="import: the run's other sections (default: the base config)")


def _import() -> None:
    import ml_collections

    from experiments.configs import base
    from nl_jax.interop import llama
    from nl_jax.layers.linear import to_dtype
    from nl_jax.train.checkpoint import save_params_only

    if not os.path.isdir(_FROM_HF.value):
        raise cli.CommandError(f"--from_hf={_FROM_HF.value}: no such directory")
    workdir = cli.writable_dir(_TO.value, "--to")
    if os.path.isdir(os.path.join(workdir, "checkpoints")):  # before reading what may be gigabytes
        raise cli.CommandError(f"--to={workdir} already holds a run: import into a new directory")
    config = _CONFIG.value if _CONFIG.value is not None else base.get_config()
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked: the model fields are replaced
    hf, weights = llama.read_weights(_FROM_HF.value, to_dtype(config.model.param_dtype))
    config.model.update(llama.model_config(hf))
    params = llama.transformer_params(weights)
    meta = {"config_name": os.path.basename(os.path.abspath(workdir)), "imported_from": _FROM_HF.value}
    save_params_only(os.path.abspath(workdir), params, config.model.to_dict(), meta)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    print(
        f"imported {_FROM_HF.value} ({config.model.num_layers} layers, d_model {config.model.d_model}, "
        f"vocab {config.model.vocab_size}) -> {workdir}\n"
        f"train:    python -m experiments.pretrain --config={os.path.join(workdir, 'config.json')} "
        f"--workdir={workdir}\n"
        f"evaluate: python -m experiments.evaluate --workdir={workdir}"
    )


def _export() -> None:
    import jax

    from nl_jax.eval.restore import checkpoint_steps, load_config
    from nl_jax.interop import llama
    from nl_jax.parallel.mesh import make_mesh
    from nl_jax.train.checkpoint import restore_params

    config = load_config(_WORKDIR.value)
    steps = checkpoint_steps(_WORKDIR.value)
    if not steps or (_STEP.value is not None and _STEP.value not in steps):
        raise cli.CommandError(
            f"--workdir={_WORKDIR.value} has no checkpoint"
            + (f" of step {_STEP.value}; its steps: {', '.join(map(str, steps))}" if steps else "")
        )
    max_positions = _MAX_POSITIONS.value or int(config.data.seq_len)
    llama.hf_config(config.model, max_positions)  # an unsupported model fails before any restore
    out = _TO_HF.value
    if os.path.exists(os.path.join(out, llama.CONFIG_FILE)) or os.path.exists(
        os.path.join(out, llama.WEIGHTS_FILE)
    ):
        raise cli.CommandError(f"--to_hf={out} already holds a model: export into a new directory")
    cli.writable_dir(out, "--to_hf")
    mesh = make_mesh(config.mesh, jax.devices()[:1])  # host arrays: any mesh the run had restores here
    params, step = restore_params(_WORKDIR.value, config.model, mesh, _STEP.value)
    llama.write_hf_checkpoint(config.model, jax.device_get(params), out, max_positions)
    print(f"exported {_WORKDIR.value} step {step} -> {out}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    importing = _FROM_HF.value is not None or _TO.value is not None
    exporting = _WORKDIR.value is not None or _TO_HF.value is not None
    if importing == exporting:
        raise app.UsageError(
            "give either --from_hf=DIR --to=WORKDIR (import) or --workdir=WORKDIR --to_hf=DIR (export)"
        )
    if importing:
        if _FROM_HF.value is None or _TO.value is None:
            raise app.UsageError("import needs both --from_hf=DIR and --to=WORKDIR")
        _import()
    else:
        if _WORKDIR.value is None or _TO_HF.value is None:
            raise app.UsageError("export needs both --workdir=WORKDIR and --to_hf=DIR")
        if _CONFIG.value is not None:
            raise app.UsageError("export reads the run's own config.json: drop --config")
        _export()


if __name__ == "__main__":
    cli.run(main)
