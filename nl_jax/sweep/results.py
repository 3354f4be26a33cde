"""One results table (markdown + CSV) and plots for a sweep, from its points' workdirs.

Columns: the point, the swept fields, its status, steps, final train loss, final and best validation
loss (the trainer's summary.json), tokens/s, parameters, wall time, the evaluation metrics of
experiments.evaluate when a point has them (perplexity / bits per byte per corpus, the paper's
commonsense columns), and the error of a failed point. Plots: every point's loss curves on one
figure (train solid, validation dashed with markers), and a bar chart of one metric.
"""

from __future__ import annotations

import csv
import io
import math

from nl_jax.eval.report import paper_row
from nl_jax.sweep import grid, runner, state
from nl_jax.sweep.plan import Plan

BASE_COLUMNS = (
    "point",
    "status",
    "steps",
    "final_train_loss",
    "final_eval_loss",
    "best_eval_loss",
    "tokens_per_s",
    "params",
    "wall_time_s",
)
METRICS = ("final_eval_loss", "best_eval_loss", "final_train_loss", "tokens_per_s")


def eval_columns(results: dict | None) -> dict:
    """Scalar columns from an eval_results.json: "<corpus> ppl" / "<corpus> bpb" of the lm suite,
    and the paper's commonsense columns that were run."""
    if not results:
        return {}
    out = {}
    for corpus, r in sorted(results.get("lm", {}).items()):
        if isinstance(r, dict) and "perplexity" in r:
            out[f"{corpus} ppl"] = r["perplexity"]
            out[f"{corpus} bpb"] = r.get("bits_per_byte")
    if results.get("commonsense"):
        out.update({k: v for k, v in paper_row(results).items() if v is not None and not k.startswith("_")})
    return out


def rows(plan: Plan) -> list[dict]:
    """One dict per point, in the plan's order (values as numbers, None when missing)."""
    evts = state.events(plan.root)
    keys = _swept_keys(plan)
    out = []
    for point in plan.points:
        summ = state.summary(plan.root, point.name) or {}
        status = runner.point_status(plan, point.name, evts)
        done = {k: v for k, v in point.overrides}
        row = {"point": point.name}
        row.update({k: grid.format_value(done[k]) if k in done else "" for k in keys})
        row.update(
            status=status,
            steps=f"{summ.get('final_step', 0)}/{plan.steps[point.name]}"
            if summ
            else f"0/{plan.steps[point.name]}",
            final_train_loss=summ.get("final_train_loss"),
            final_eval_loss=summ.get("final_eval_loss"),
            best_eval_loss=summ.get("best_eval_loss"),
            tokens_per_s=summ.get("tokens_per_s"),
            params=summ.get("params"),
            wall_time_s=summ.get("wall_time_s"),
        )
        row.update(eval_columns(state.eval_results(plan.root, point.name)))
        last = state.last_outcome(evts, point.name)
        row["error"] = (
            last.get("error", "") if last and last["event"] == "failed" and status != "finished" else ""
        )
        out.append(row)
    return out


def _swept_keys(plan: Plan) -> list[str]:
    keys = []
    for p in plan.points:
        keys += [k for k, _ in p.overrides if k not in keys]
    return keys


def columns(plan: Plan, table: list[dict]) -> list[str]:
    cols = ["point", *_swept_keys(plan), *BASE_COLUMNS[1:]]
    for r in table:
        cols += [k for k in r if k not in cols and k != "error"]
    return cols + (["error"] if any(r.get("error") for r in table) else [])


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if key == "params":
        return f"{int(v):,}"
    if key == "tokens_per_s":
        return f"{v:,.0f}"
    if key == "wall_time_s":
        return f"{v:.0f}"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"
    return str(v).replace("|", "\\|")


def markdown(plan: Plan, table: list[dict], header: str = "") -> str:
    cols = columns(plan, table)
    lines = [header] if header else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(c, r.get(c)) for c in cols) + " |" for r in table]
    return "\n".join(lines) + "\n"


def to_csv(plan: Plan, table: list[dict]) -> str:
    cols = columns(plan, table)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in table:
        w.writerow({c: "" if r.get(c) is None else r.get(c) for c in cols})
    return buf.getvalue()


def _curves(plan: Plan, name: str) -> dict:
    """{"train": [(step, loss)], "eval": [...]}, the last row per (split, step) since a resumed run
    logs again the steps after its checkpoint."""
    rows_ = state.read_jsonl_text(state.read_text(state.join(plan.root, name, "metrics.jsonl")))
    last = {(r.get("split"), r.get("step")): r for r in rows_ if "loss" in r}
    out = {"train": [], "eval": []}
    for (split, step), r in sorted(last.items(), key=lambda kv: kv[0][1]):
        if split in out and math.isfinite(r["loss"]):
            out[split].append((step, r["loss"]))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    if "://" in path:
        from etils import epath

        epath.Path(path).write_bytes(buf.getvalue())
    else:
        with open(path, "wb") as f:
            f.write(buf.getvalue())
    return path


def plot_loss_curves(plan: Plan, path: str, title: str = "") -> str | None:
    """All points' train (solid) and validation (dashed, markers) loss against step."""
    curves = {p.name: _curves(plan, p.name) for p in plan.points}
    if not any(c["train"] or c["eval"] for c in curves.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, c) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        if c["train"]:
            ax.plot(*zip(*c["train"]), color=color, lw=1.1, label=name)
        if c["eval"]:
            ax.plot(*zip(*c["eval"]), "o--", color=color, lw=1.0, ms=3, label=None if c["train"] else name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token): train solid, validation dashed")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 8 else 1)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_metric(plan: Plan, table: list[dict], metric: str, path: str, title: str = "") -> str | None:
    """A bar per point of `metric` (points without a value are labelled with their status)."""
    if not any(isinstance(r.get(metric), (int, float)) for r in table):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(table) + 2), 4.2), dpi=120)
    names = [r["point"] for r in table]
    have = [isinstance(r.get(metric), (int, float)) for r in table]
    values = [float(r[metric]) if h else 0.0 for r, h in zip(table, have)]
    bars = ax.bar(range(len(names)), values, color="#4c72b0")
    finite = [v for v, h in zip(values, have) if h]
    lo, hi = min(finite), max(finite)
    if metric != "tokens_per_s":  # losses of ablations differ in the 2nd digit: do not start at 0
        pad = hi - lo + 1e-3
        ax.set_ylim(lo - 0.5 * pad, hi + 0.3 * pad)
    bottom = ax.get_ylim()[0]
    for b, r, v, h in zip(bars, table, values, have):
        text = _fmt(metric, r[metric]) if h else r["status"]  # a point with no value: its status
        ax.annotate(
            text, (b.get_x() + b.get_width() / 2, v if h else bottom), ha="center", va="bottom", fontsize=7
        )
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def collect(plan: Plan, *, metric: str = "final_eval_loss", header: str = "") -> dict:
    """Writes results.md, results.csv, loss_curves.png and <metric>.png under the root; returns
    {"table": rows, "markdown": text, and the paths}."""
    table = rows(plan)
    if metric not in columns(plan, table):
        raise ValueError(
            f"--metric={metric!r} is not a column; choose from {', '.join(columns(plan, table)[1:])}"
        )
    title = f"{plan.config}: {plan.sweep}"
    md = markdown(plan, table, header)
    paths = {
        "markdown_path": state.join(plan.root, "results.md"),
        "csv_path": state.join(plan.root, "results.csv"),
    }
    state.write_text(paths["markdown_path"], md)
    state.write_text(paths["csv_path"], to_csv(plan, table))
    paths["loss_curves"] = plot_loss_curves(plan, state.join(plan.root, "loss_curves.png"), title)
    safe = grid.slug(metric).replace(".", "_")
    paths["metric_plot"] = plot_metric(plan, table, metric, state.join(plan.root, f"{safe}.png"), title)
    return {"table": table, "markdown": md, **paths}
