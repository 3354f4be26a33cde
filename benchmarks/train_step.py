"""Training throughput of HOPE against its baselines at equal parameters, one command, one table.

    python -m benchmarks.train_step                              # T = 256 (8 x 256) and T = 2048 (1 x 2048)
    python -m benchmarks.train_step --lengths=256 --models=transformer,hope_ntp
    python -m benchmarks.train_step --peers                      # + nested-learning (PyTorch), see below

Each row is one `nl_jax.train.run` of the named config in a fresh subprocess, as
`python -m experiments.pretrain` runs it (embedded corpus, data pipeline, metrics; no checkpoints,
one validation batch at the end): tokens/s over `--steps` timed steps that follow the first step
(which compiles) and `--warmup` untimed ones, the window's ends waiting for the step's result; MFU
by the trainer's FLOP count; the time from the subprocess's start to the end of its first step
(imports, data, compilation); and the subprocess's peak resident memory. The warm-up: the steps
right after the compile run slower than the steady ones. The PyTorch rows take the same untimed
steps and the same mean over their timed steps. Each nl_jax
row's process re-executes itself with malloc on transparent huge pages, as every experiments command
does (experiments/host_memory.py); the PyTorch rows run with glibc's defaults. The baselines'
SwiGLU widths are solved so that every model has the parameters of the HOPE config (`--base`);
ratios are to the Transformer++ row of the same length, measured in this one run. Each length runs
`--rounds` rounds, each the Transformer++ and then every other row once, because a shared machine's
load changes from minute to minute: every row gives its median round, and its ratio is the median
of the rounds' ratios, each round's row against that round's Transformer++.

`--peers` adds rows for the PyTorch package nested-learning (its `hope_selfmod` model and its
transformer) at `--peers_shape`, with nl_jax's `hope` (ntp signal) and `transformer` at the same
shape, run by `--peers_python` (an interpreter where `torch` and `nested_learning` import; the
set-up is in benchmarks/peers.py). Neither package is a dependency of nl_jax. The two transformers
run alternately `--peers_rounds` times (a shared machine's load changes from minute to minute more
than the two differ): their rows give the median round, and PyTorch's ratio is the median of the
rounds' ratios, each round's two runs one right after the other.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks.config_overrides import apply_overrides, parse_overrides
from experiments import host_memory

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "lengths", ["256", "2048"], "sequence lengths T; each step holds max(1, 2048 // T) sequences"
)
flags.DEFINE_list(
    "models", ["transformer", "titans", "hope_none", "hope_local", "hope_ntp"], "rows (see MODELS)"
)
flags.DEFINE_string("base", "hope_tiny", "the HOPE config whose parameter count every row matches")
flags.DEFINE_integer(
    "rounds", 3, "rounds of each length's rows (the Transformer++ first in each); a row gives its median round"
)
flags.DEFINE_integer("steps", 10, "timed steps, after the first (compiling) one and the warm-up")
flags.DEFINE_integer("warmup", 5, "untimed steps after the first, before the timed ones (every row, the peers' too)")
flags.DEFINE_integer("tokens_per_step", 2048, "batch = max(1, tokens_per_step // T)")
flags.DEFINE_multi_string(
    "override", [], "extra --config overrides for every row, e.g. model.scan_layers=False"
)
flags.DEFINE_bool("peers", False, "also time nested-learning's hope_selfmod and transformer (PyTorch)")
flags.DEFINE_string("peers_python", sys.executable, "interpreter with torch and nested_learning")
flags.DEFINE_string("peers_shape", "d_model=128,num_layers=2,batch=4,seq_len=256", "shape of the peer rows")
flags.DEFINE_integer(
    "peers_rounds",
    3,
    "the two transformers at the peers' shape (nl_jax's and PyTorch's) run alternately this many times; "
    "their rows report the median round and the median of the rounds' ratios",
)
flags.DEFINE_integer(
    "peers_steps", 3, "timed steps of nested-learning's hope_selfmod (seconds per step; its transformer: --steps)"
)
flags.DEFINE_string("json", "", "also write the rows to this file")
# The worker: one row in this process (the parent runs it as a subprocess).
flags.DEFINE_string("worker_config", "", "internal: config name of one row")
flags.DEFINE_string("worker_overrides", "{}", "internal: its overrides, a json object")
flags.DEFINE_float("worker_start", 0.0, "internal: the parent's clock when it started the worker")

# row name -> (config family, overrides): the family's config of the base's size (hope_340m ->
# transformer_340m), or the base itself (None); baselines get their SwiGLU width solved at run time
MODELS = {
    "transformer": ("transformer", {}),
    "titans": ("titans", {}),
    "hope_none": (None, {"model.cms.signal": "none"}),
    "hope_local": (None, {"model.cms.signal": "local"}),
    "hope_ntp": (None, {"model.cms.signal": "ntp"}),
}


def _config_name(family: str | None) -> str:
    """The config of `family` at the base's size: the base's name with its family replaced."""
    if family is None:
        return FLAGS.base
    return f"{family}_{FLAGS.base.rsplit('_', 1)[1]}"


def matched_mlp_hidden(name: str, params: int, extra: dict) -> int:
    """The SwiGLU width (a multiple of 8) that brings config `name`, with the `extra` overrides, closest
    to `params` parameters."""
    from experiments import configs  # noqa: PLC0415
    from nl_jax.models import count_params  # noqa: PLC0415

    cfg = configs.load(name).model

    def count(h):
        cfg.mlp_hidden = h
        return count_params(cfg)

    apply_overrides(cfg, {k[len("model.") :]: v for k, v in extra.items() if k.startswith("model.")})

    lo, hi = 8, 8 * 4096
    while hi - lo > 8:  # count grows with the width
        mid = (lo + hi) // 16 * 8
        lo, hi = (mid, hi) if count(mid) < params else (lo, mid)
    return min((lo, hi), key=lambda h: abs(count(h) - params))


def _worker(config_name: str, overrides: dict) -> dict:
    """Runs one row in this process and returns its measurements."""
    import jax  # noqa: PLC0415

    from experiments import configs  # noqa: PLC0415
    from nl_jax.train import Hook, run  # noqa: PLC0415

    config = apply_overrides(configs.load(config_name), overrides)
    # The first step compiles; `warmup` more run untimed; the timed window ends a step before the
    # last, whose end the run's final evaluation follows.
    warmup, timed = FLAGS.warmup, FLAGS.steps
    config.train.update(steps=warmup + timed + 2, log_every=warmup + timed + 2)
    config.eval.update(every=0, max_batches=1)
    config.checkpoint.enabled = False
    marks = {}

    def mark(step, state, row):
        del row
        if step in (1, 1 + warmup, 1 + warmup + timed):
            jax.block_until_ready(state)  # the step's result, not its dispatch
            marks[step] = time.perf_counter()
            marks.setdefault("first", time.time())

    with tempfile.TemporaryDirectory() as workdir:
        summary = run(config, workdir, config_name=config_name, hooks=[Hook(1, mark)])
    tokens_per_step = int(config.data.global_batch_size) * int(config.data.seq_len)
    tokens_per_s = timed * tokens_per_step / (marks[1 + warmup + timed] - marks[1 + warmup])
    return dict(
        params=summary["params"],
        tokens_per_s=tokens_per_s,
        mfu=summary["mfu"] * tokens_per_s / summary["tokens_per_s"],  # the trainer's FLOP count
        train_flops_per_token=summary["train_flops_per_token"],
        first_step_s=marks["first"] - FLAGS.worker_start,
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        jax=jax.__version__,
        device=jax.devices()[0].device_kind,
    )


def _subprocess(args: list[str]) -> dict:
    """Runs a row's process; its last JSON line is the row. nl_jax workers get the start time, to
    count their first step from the same clock (the peers read their process start from /proc).
    Each starts without this process's malloc tunable: a worker sets it itself (re-executing, as
    `experiments.pretrain` does), the peers run with glibc's defaults, as installed."""
    if "--worker_config" in " ".join(args):
        args = [*args, f"--worker_start={time.time()}"]
    env = host_memory.without_tunable(os.environ)
    out = subprocess.run(args, capture_output=True, text=True, cwd=os.getcwd(), env=env, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {out.returncode}"}
    return json.loads(lines[-1])


def _row(name: str, config_name: str, overrides: dict) -> dict:
    res = _subprocess(
        [
            sys.executable,
            "-m",
            "benchmarks.train_step",
            f"--worker_config={config_name}",
            f"--worker_overrides={json.dumps(overrides)}",
        ]
    )
    return dict(model=name, config=config_name, overrides=overrides, **res)


def _peer_row(kind: str, loop: str, shape: dict) -> dict:
    args = [f"--{k}={v}" for k, v in shape.items()]
    res = _subprocess(
        [
            FLAGS.peers_python,
            "-m",
            "benchmarks.peers",
            f"--kind={kind}",
            f"--loop={loop}",
            f"--steps={FLAGS.peers_steps if kind == 'hope_selfmod' else FLAGS.steps}",
            f"--warmup={FLAGS.warmup}",
            "--vocab=260",
            *args,
        ]
    )
    res.pop("kind", None)
    return dict(model=f"nested-learning {kind} ({loop})", **res)


def round_schedule(models: list[str], rounds: int) -> list[str]:
    """One length's runs in the order they run: `rounds` rounds, each the Transformer++ (every ratio's
    reference) first and then the other rows in order."""
    order = (["transformer"] if "transformer" in models else []) + [m for m in models if m != "transformer"]
    return order * rounds


def median_round(rounds: list[dict], refs: list[dict] | None = None) -> dict:
    """One row from alternated rounds of it: the round of median tokens/s (the lower of the middle two
    for an even count) with every round's tokens/s under "rounds"; against `refs` (the same rounds of
    the reference row) also "ratio", the median of the rounds' ratios to it. A round's error is the row's."""
    failed = next((r for r in rounds if "error" in r), None)
    if failed is not None:
        return failed
    tokens = [r["tokens_per_s"] for r in rounds]
    row = dict(sorted(rounds, key=lambda r: r["tokens_per_s"])[(len(rounds) - 1) // 2], rounds=tokens)
    if refs is not None:
        if any("error" in r for r in refs):
            return dict(row, ratio=None)
        ratios = [t / r["tokens_per_s"] for t, r in zip(tokens, refs)]
        row.update(ratio=sorted(ratios)[(len(ratios) - 1) // 2], round_ratios=ratios)
    return row


def length_rows(runs: dict) -> list[dict]:
    """One length's rows from its rounds (name -> one run per round, in round order): the
    Transformer++'s median round first, then every other row's median round with the median of its
    ratios to the Transformer++ of the same rounds."""
    reference = runs.get("transformer")
    rows = [median_round(reference)] if reference else []
    return rows + [median_round(r, reference) for name, r in runs.items() if name != "transformer"]


def _print_table(rows: list[dict]) -> None:
    print(
        f"{'model':<38} {'T':>5} {'batch':>5} {'params':>10} {'tokens/s':>9} {'x Transformer++':>15} "
        f"{'MFU':>6} {'first step s':>12} {'peak RSS GiB':>12}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<38} {r.get('seq_len', ''):>5} error: {r['error']}")
            continue
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(
            f"{r['model']:<38} {r['seq_len']:>5} {r['batch']:>5} {r['params']:>10,} {r['tokens_per_s']:>9,.0f} "
            f"{ratio:>15} {mfu:>6} {r['first_step_s']:>12.1f} {r['peak_rss_gb']:>12.2f}"
        )


def main(argv):
    del argv
    if FLAGS.worker_config:
        print(json.dumps(_worker(FLAGS.worker_config, json.loads(FLAGS.worker_overrides))), flush=True)
        return

    from experiments import configs  # noqa: PLC0415
    from nl_jax.models import count_params  # noqa: PLC0415

    extra = parse_overrides(FLAGS.override)
    target = count_params(apply_overrides(configs.load(FLAGS.base), extra).model)
    widths = {}
    rows = []
    for t in map(int, FLAGS.lengths):
        batch = max(1, FLAGS.tokens_per_step // t)

        def run_row(name):
            family, overrides = MODELS[name]
            config_name = _config_name(family)
            overrides = {**overrides, **extra, "data.seq_len": t, "data.global_batch_size": batch}
            if config_name != FLAGS.base:
                if config_name not in widths:
                    widths[config_name] = matched_mlp_hidden(config_name, target, extra)
                overrides["model.mlp_hidden"] = widths[config_name]
            row = dict(_row(name, config_name, overrides), seq_len=t, batch=batch)
            print(f"  {name} T={t}: " + json.dumps({k: v for k, v in row.items() if k != "overrides"}), flush=True)
            return row

        runs = {}
        for name in round_schedule(FLAGS.models, FLAGS.rounds):
            runs.setdefault(name, []).append(run_row(name))
        rows += length_rows(runs)
    if FLAGS.peers:
        shape = {k: int(v) for k, v in (kv.split("=") for kv in FLAGS.peers_shape.split(","))}
        mine = {
            "model.d_model": shape["d_model"],
            "model.num_layers": shape["num_layers"],
            "data.seq_len": shape["seq_len"],
            "data.global_batch_size": shape["batch"],
        }
        at_shape = dict(seq_len=shape["seq_len"], batch=shape["batch"])
        # Their transformer as a plain step (forward, backward, AdamW: no memory writes to make),
        # alternating with ours, so that both see the same load on a shared machine.
        ours, theirs = [], []
        for _ in range(FLAGS.peers_rounds):
            ours.append(_row("transformer (peers shape)", _config_name("transformer"), {**mine, **extra}))
            theirs.append(_peer_row("transformer", "plain", shape))
        rows += [dict(median_round(ours), **at_shape), dict(median_round(theirs, ours), **at_shape)]
        # Their HOPE through the package's own training loop, which writes the memories.
        row = _row("hope_ntp (peers shape)", FLAGS.base, {**mine, "model.cms.signal": "ntp", **extra})
        rows += [dict(row, **at_shape), dict(_peer_row("hope_selfmod", "package", shape), **at_shape)]
    for r in rows:  # ratios to the Transformer++ row of the same length (and shape)
        peers = "shape" in r["model"] or r["model"].startswith("nested-learning")
        ref = next(
            (
                x
                for x in rows
                if x["seq_len"] == r["seq_len"]
                and "error" not in x
                and x["model"] == ("transformer (peers shape)" if peers else "transformer")
            ),
            None,
        )
        if "ratio" not in r:
            r["ratio"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref and "error" not in r else None
    print()
    _print_table(rows)
    for r in rows:
        if "rounds" in r:
            ratios = ""
            if "round_ratios" in r:
                ratios = ", ratios to the reference by round " + ", ".join(f"{x:.2f}" for x in r["round_ratios"])
            rounds = ", ".join(f"{x:,.0f}" for x in r["rounds"])
            print(f"{r['model']} (T = {r['seq_len']}): tokens/s by round {rounds}{ratios}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()  # as the experiments commands run
    app.run(main)
