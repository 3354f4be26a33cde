r"""Ablation sweeps: a base config times a grid of `--config.*` overrides; one table and plots.

    python -m experiments.sweep --config=hope_tiny --sweep=hope_ablation            # the paper's table, CPU
    python -m experiments.sweep --config=transformer_tiny \
        --grid=config.optim.name=adamw,m3 --grid=config.optim.lr=1e-3,3e-3          # a 2 x 2 grid
    python -m experiments.sweep --config=hope_tiny --sweep=cms_levels --mode=print  # the commands only
    python -m experiments.sweep --config=hope_760m --sweep=hope_ablation --workdir=gs://B/sweeps/abl \
        --mode=launch --launch='launch/run.sh --name hope-abl --zone us-east5-a'   # on a TPU slice
    python -m experiments.sweep --workdir=runs/sweeps/hope_tiny_hope_ablation --collect  # table again

Named sweeps (`--sweep`, nl_jax/sweep/named.py): hope_ablation, cms_levels, chunk_sizes,
optimizers. `--grid=KEY=V1,V2` adds an axis (values typed by the config's field; a tuple value is
written in brackets: `--grid=config.model.cms.periods=(16,64),(16,128)`); a named sweep and grids
multiply. `--config.a.b=v` applies to every point. Each point trains in `WORKDIR/POINT`
(default WORKDIR: runs/sweeps/CONFIG_SWEEP).

Modes: `local` runs the points one after the other here, each as a `python -m experiments.pretrain`
subprocess; `print` prints those commands; `launch` runs each through a launch/ script (`--launch` is
the script and its options; the sweep adds `--run-name POINT --foreground -- CMD`, so the points run in
turn on one slice; `{index}` in `--launch`, as in `--name abl-{index}`, gives point i its own slice,
where it starts detached). Re-running the same command skips finished points, resumes interrupted ones
from their checkpoints, and skips failed ones unless `--retry_failed`. A failure is recorded in
WORKDIR/status.jsonl and the sweep goes on. At the end, and with `--collect`, it writes
WORKDIR/results.{md,csv}, loss_curves.png and a bar chart of `--metric`. Exit code: 0 when every point
finished, 1 when some failed, 130 / 143 when interrupted; a bad flag, grid or config is one `error:`
line and exit code 2 (experiments/cli.py).
"""

import os
import platform
import shlex
import sys

from absl import app, flags
from experiments import cli, config_flag, configs


_CONFIG = config_flag.define(help_text="base config name (experiments/configs/NAME.py) or path")
_SWEEP = flags.DEFINE_string(
    "sweep", "", "named sweep: hope_ablation | cms_levels | chunk_sizes | optimizers"
)
_GRID = flags.DEFINE_multi_string(
    "grid", [], "an axis KEY=V1,V2,... (e.g. config.optim.lr=1e-3,3e-3); repeatable"
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "sweep root; points in WORKDIR/POINT (default runs/sweeps/CONFIG_SWEEP)"
)
_MODE = flags.DEFINE_enum(
    "mode", "local", ["local", "print", "launch"], "run here, print commands, or launch"
)
_LAUNCH = flags.DEFINE_string(
    "launch", "", "launch mode: the launch/ script and its options, e.g. 'launch/run.sh --name TPU --zone Z'"
)
_EVAL_SUITE = flags.DEFINE_string(
    "eval_suite", "", "run experiments.evaluate --suite=... on each finished point"
)
_EVAL_ARGS = flags.DEFINE_string("eval_args", "", "more experiments.evaluate flags, e.g. '--limit=200'")
_RETRY = flags.DEFINE_bool("retry_failed", False, "run points that failed before again")
_COLLECT = flags.DEFINE_bool("collect", False, "only write the table and plots from what the points have")
_METRIC = flags.DEFINE_string("metric", "final_eval_loss", "the column of the bar chart")
_ECHO = flags.DEFINE_bool(
    "echo", True, "echo each point's output (it always goes to WORKDIR/POINT/train.log)"
)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu})"


def _plan():
    from nl_jax.sweep import make_plan, plan_from_manifest

    if _CONFIG.value is None:
        if _COLLECT.value and _WORKDIR.value:
            return plan_from_manifest(_WORKDIR.value)
        raise app.UsageError(f"--config=NAME is required; names: {', '.join(configs.names())}")
    overrides = dict(flags.FLAGS["config"].override_values)
    return make_plan(
        flags.FLAGS["config"].config_filename,
        _CONFIG.value,
        overrides,
        sweep=_SWEEP.value,
        grid_flags=_GRID.value,
        root=_WORKDIR.value or "",
        eval_suite=_EVAL_SUITE.value,
        eval_args=shlex.split(_EVAL_ARGS.value),
        command=shlex.join(["python", "-m", "experiments.sweep", *_sweep_argv()]),
    )


def _sweep_argv() -> list[str]:
    """This command line without the flags that only pick what to do with the sweep."""
    drop = ("--collect", "--nocollect", "--mode", "--retry_failed", "--noretry_failed", "--echo", "--noecho")
    return [a for a in sys.argv[1:] if a.split("=", 1)[0] not in drop]


def _collect(plan) -> dict:
    from nl_jax.sweep import collect

    header = (
        f"Sweep `{plan.sweep}` of `{plan.config}`, {len(plan.points)} points: `{plan.command}`\n\n"
        f"Machine: {_machine()}\n"
    )
    out = collect(plan, metric=_METRIC.value, header=header)
    print(out["markdown"])
    for key in ("markdown_path", "csv_path", "loss_curves", "metric_plot"):
        if out[key]:
            print(f"{key.replace('_', ' ')}: {out[key]}")
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from nl_jax.sweep import print_commands, run_launch, run_local

    plan = None
    try:
        plan = _plan()
        if _COLLECT.value:
            _collect(plan)
            return
        if _MODE.value == "print":
            print("\n".join(print_commands(plan)))
            return
        print(f"sweep {plan.sweep} of {plan.config}: {len(plan.points)} points in {plan.root}", flush=True)
        if _MODE.value == "launch":
            if "://" not in plan.root:
                print(
                    f"warning: --workdir={plan.root} is local to each TPU worker; use gs:// to collect here"
                )
            outcome = run_launch(plan, _LAUNCH.value, retry_failed=_RETRY.value)
        else:
            outcome = run_local(plan, retry_failed=_RETRY.value, echo=_ECHO.value)
    except KeyboardInterrupt:
        if plan is not None:
            _collect(plan)
        raise cli.CommandError("interrupted: re-run the same command to resume", cli.INTERRUPTED) from None
    _collect(plan)
    if outcome.interrupted_by:
        sys.exit(128 + outcome.interrupted_by)
    if outcome.failed:
        print(f"failed points: {', '.join(outcome.failed)} (see {plan.root}/status.jsonl)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
