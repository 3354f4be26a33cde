"""Results tables laid out like the paper's (docs/design.md, "Results tables"), from the evaluate JSON.

Language modeling and commonsense (Tables 1/2): Wiki ppl, LMB ppl, LMB acc, PIQA acc, Hella
acc_norm, Wino acc, ARC-e acc, ARC-c acc_norm, SIQA acc, BoolQ acc, Avg = the mean of the 8
accuracy columns. "Wiki ppl" is word perplexity (lm-evaluation-harness `wikitext`, independent of
the tokenizer); a missing entry is "-" and the average then covers the columns present (marked *).
NIAH (Table 1 of the long version): accuracy per task at each length, "a/b/c" over the lengths.
In-context recall (Table 3) and MAD (Table 4): accuracy per task and their average. Formal
languages (Table 5): accuracy per language, "in distribution / beyond the training length".
BABILong: accuracy per task and length, and the mean over the tasks. Class-incremental learning:
final average accuracy and mean forgetting per dataset, for the carried state and its baselines.
"""

from __future__ import annotations

import json
import os

# (column, section, task, metric)
PAPER_COLUMNS = (
    ("Wiki ppl", "lm", "wikitext", "word_perplexity"),
    ("LMB ppl", "commonsense", "lambada", "perplexity"),
    ("LMB acc", "commonsense", "lambada", "acc"),
    ("PIQA", "commonsense", "piqa", "acc"),
    ("Hella acc_n", "commonsense", "hellaswag", "acc_norm"),
    ("Wino", "commonsense", "winogrande", "acc"),
    ("ARC-e", "commonsense", "arc_easy", "acc"),
    ("ARC-c acc_n", "commonsense", "arc_challenge", "acc_norm"),
    ("SIQA", "commonsense", "siqa", "acc"),
    ("BoolQ", "commonsense", "boolq", "acc"),
)
ACCURACY_COLUMNS = PAPER_COLUMNS[2:]


def _get(results: dict, section: str, task: str, metric: str):
    return results.get(section, {}).get(task, {}).get(metric)


def paper_row(results: dict) -> dict:
    """Column -> value (None when missing) and "Avg"."""
    row = {col: _get(results, s, t, m) for col, s, t, m in PAPER_COLUMNS}
    accs = [row[c] for c, *_ in ACCURACY_COLUMNS if row[c] is not None]
    row["Avg"] = sum(accs) / len(accs) if accs else None
    row["_complete"] = len(accs) == len(ACCURACY_COLUMNS)
    return row


def _fmt(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def paper_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per model name, from each model's results dict."""
    cols = [c for c, *_ in PAPER_COLUMNS] + ["Avg"]
    lines = ["| Model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, results in rows.items():
        row = paper_row(results)
        cells = [_fmt(row[c]) for c, *_ in PAPER_COLUMNS]
        avg = _fmt(row["Avg"]) + ("" if row["_complete"] or row["Avg"] is None else "*")
        lines.append(f"| {name} | " + " | ".join(cells + [avg]) + " |")
    return "\n".join(lines)


def niah_table(rows: dict[str, dict]) -> str:
    """Markdown table: model x NIAH task, cells "acc@len1/acc@len2/..." (lengths in the header)."""
    from nl_jax.eval.niah import TASK_TITLES, TASKS

    tasks, lengths = [], []
    for results in rows.values():
        acc = results.get("niah", {}).get("accuracy", {})
        for t in TASKS:
            if t in acc and t not in tasks:
                tasks.append(t)
            for n in acc.get(t, {}):
                if n not in lengths:
                    lengths.append(n)
    lengths.sort(key=int)
    if not tasks:
        return ""
    span = "/".join(f"{int(n) // 1024}K" if int(n) % 1024 == 0 else n for n in lengths)
    lines = [
        f"| Model ({span}) | " + " | ".join(TASK_TITLES[t] for t in tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for name, results in rows.items():
        acc = results.get("niah", {}).get("accuracy", {})
        cells = ["/".join(_fmt(acc.get(t, {}).get(n), 1) for n in lengths) for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lm_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per (model, corpus) of the `lm` suite."""
    lines = [
        "| Model | corpus | mode | tokens | loss | ppl | bits/byte | word ppl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, results in rows.items():
        for corpus, r in results.get("lm", {}).items():
            cells = [corpus, r.get("mode", "-"), r.get("num_tokens")]
            cells += [_fmt(r.get(k), d) for k, d in (("loss", 4), ("perplexity", 2), ("bits_per_byte", 4))]
            cells.append(_fmt(r.get("word_perplexity")))
            lines.append(f"| {name} | " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def lm_eval_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per (model, harness task), a column per metric any task reported."""
    tasks = {
        (name, task): r
        for name, results in rows.items()
        for task, r in results.get("lm_eval", {}).items()
        if not task.startswith("_")
    }
    metrics = sorted({m for r in tasks.values() for m in r if m != "seconds" and not m.endswith("_stderr")})
    if not tasks:
        return ""
    lines = ["| Model | task | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for (name, task), r in tasks.items():
        cells = [_fmt(r.get(m), 4) if m in r else "-" for m in metrics]
        lines.append(f"| {name} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _task_accuracy_table(rows: dict[str, dict], suite: str, metric: str, all_tasks, titles) -> str:
    """Markdown table: model x task accuracy (%) of one suite, Avg over the tasks present (* when
    some are missing)."""
    tasks = [t for t in all_tasks if any(t in r.get(suite, {}) for r in rows.values())]
    if not tasks:
        return ""
    lines = ["| Model | " + " | ".join(titles[t] for t in tasks) + " | Avg |", "|---" * (len(tasks) + 2) + "|"]
    for name, results in rows.items():
        accs = [results.get(suite, {}).get(t, {}).get(metric) for t in tasks]
        present = [a for a in accs if a is not None]
        avg = _fmt(sum(present) / len(present), 1) if present else "-"
        avg += "*" if present and len(present) < len(all_tasks) else ""
        lines.append(f"| {name} | " + " | ".join(_fmt(a, 1) for a in accs) + f" | {avg} |")
    return "\n".join(lines)


def recall_table(rows: dict[str, dict]) -> str:
    """Model x recall task accuracy (%), the "contains" metric (`_task_accuracy_table`)."""
    from nl_jax.eval.recall import TASKS, TITLES

    return _task_accuracy_table(rows, "recall", "contains", TASKS, TITLES)


def babilong_table(rows: dict[str, dict]) -> str:
    """Markdown table: a row per model and BABILong task, a column per length, accuracy (%); each
    model's "avg" row is the mean over its tasks at each length."""
    from nl_jax.eval.babilong import TASKS, length_tokens

    lengths = sorted(
        {n for r in rows.values() for t, by in r.get("babilong", {}).items() if t in TASKS for n in by},
        key=length_tokens,
    )
    if not lengths:
        return ""
    lines = [
        "| Model | task | " + " | ".join(n.upper() for n in lengths) + " |",
        "|---" * (len(lengths) + 2) + "|",
    ]
    for name, results in rows.items():
        res = results.get("babilong", {})
        tasks = [t for t in TASKS if t in res]
        for t in tasks:
            cells = [_fmt(res[t].get(n, {}).get("accuracy"), 1) for n in lengths]
            lines.append(f"| {name} | {t} | " + " | ".join(cells) + " |")
        if len(tasks) > 1:
            cells = []
            for n in lengths:
                accs = [res[t][n]["accuracy"] for t in tasks if n in res[t]]
                cells.append(_fmt(sum(accs) / len(accs), 1) if accs else "-")
            lines.append(f"| {name} | avg | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CI_METHODS = {"carried": "state carried", "reset": "state reset each stage", "icl": "ICL (context window)"}


def class_incremental_summary(rows: dict[str, dict]) -> str:
    """Markdown table: a row per model and memory (carried, reset, ICL), a column per dataset,
    cells "final average accuracy / mean forgetting" (%)."""
    from nl_jax.eval.class_incremental_data import DATASETS, TITLES

    names = [d for d in DATASETS if any(d in r.get("class_incremental", {}) for r in rows.values())]
    if not names:
        return ""
    lines = [
        "| Model | memory | " + " | ".join(TITLES[d] for d in names) + " |",
        "|---" * (len(names) + 2) + "|",
    ]
    for name, results in rows.items():
        res = results.get("class_incremental", {})
        for method, title in CI_METHODS.items():
            runs = [res.get(d, {}).get(method) for d in names]
            if any(runs):
                cells = [
                    f"{r['final_average_accuracy']:.1f} / {r['mean_forgetting']:.1f}" if r else "-"
                    for r in runs
                ]
                lines.append(f"| {name} | {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mad_table(rows: dict[str, dict]) -> str:
    """Model x MAD task accuracy (%) (`_task_accuracy_table`)."""
    from nl_jax.eval.mad import TASKS, TITLES

    return _task_accuracy_table(rows, "mad", "accuracy", TASKS, TITLES)


def formal_table(rows: dict[str, dict]) -> str:
    """Markdown table: model x language, cells "in distribution / beyond the training length" (%)."""
    from nl_jax.eval.formal import LANGUAGES, TITLES

    langs = [g for g in LANGUAGES if any(g in r.get("formal", {}) for r in rows.values())]
    if not langs:
        return ""
    lines = ["| Model | " + " | ".join(TITLES[g] for g in langs) + " |", "|---" * (len(langs) + 1) + "|"]
    for name, results in rows.items():
        cells = []
        for g in langs:
            r = results.get("formal", {}).get(g, {})
            cells.append(f"{_fmt(r.get('accuracy_id'), 1)} / {_fmt(r.get('accuracy_ood'), 1)}" if r else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _hparam(x) -> str:
    return "run's" if x is None else f"{x:g}"


def grid_winners(rows: dict[str, dict], suite: str) -> str:
    """Lines "model: task lr / weight decay, ..." naming each task's best grid point, for the runs
    whose tasks trained at more than one point ("" when none did)."""
    from nl_jax.eval import formal, mad

    titles = {"mad": mad.TITLES, "formal": formal.TITLES}[suite]
    lines = []
    for name, results in rows.items():
        won = [
            f"{titles[task]} {_hparam(r['lr'])} / {_hparam(r['weight_decay'])}"
            for task, r in results.get(suite, {}).items()
            if task[0] != "_" and len(r.get("grid", ())) > 1
        ]
        if won:
            lines.append(f"- {name}: " + ", ".join(won))
    if not lines:
        return ""
    return "Best (learning rate / weight decay) of the grid per task:\n\n" + "\n".join(lines)


def memorization_table(rows: dict[str, dict]) -> str:
    """Markdown table: test-time memorization of each model (continual suite)."""
    lines = [
        "| Model | segments x len | state len | reset | carried | repeat | context gain | memorization gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, results in rows.items():
        m = results.get("continual", {}).get("memorization")
        if m:
            lines.append(
                f"| {name} | {m['num_segments']} x {m['segment_len']} | {m['state_len']} | "
                f"{m['mean_reset']:.4f} | {m['mean_carried']:.4f} | {m['mean_repeat']:.4f} | "
                f"{m['context_gain']:.4f} | {m['memorization_gain']:.4f} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def class_incremental_table(c: dict, reset: dict | None = None) -> str:
    """Markdown table: accuracy on each stage's classes after each stage, with forgetting."""
    lines = [
        "| after stage | " + " | ".join(f"stage {j}" for j in range(len(c["stages"]))) + " | average |",
        "|---" * (len(c["stages"]) + 2) + "|",
    ]
    for s, row in enumerate(c["accuracy"]):
        cells = [_fmt(x, 1) for x in row] + ["-"] * (len(c["stages"]) - len(row))
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {_fmt(c['average_accuracy'][s], 1)} |")
    lines += ["", f"mean forgetting: {c['mean_forgetting']:.1f}"]
    if reset:
        lines.append(
            f"state reset at each stage (baseline): final average {reset['final_average_accuracy']:.1f}, "
            f"mean forgetting {reset['mean_forgetting']:.1f}"
        )
    return "\n".join(lines)


def markdown_report(rows: dict[str, dict], title: str = "") -> str:
    """Every table for one or several models (a row per model; sections nobody ran are left out)."""
    parts = [f"# Evaluation: {title or ', '.join(rows)}", ""]
    for name, results in rows.items():
        meta = results.get("meta", {})
        if meta:
            parts += [
                (f"{name}: " if len(rows) > 1 else "") + ", ".join(f"{k}: {v}" for k, v in meta.items()),
                "",
            ]
    if any(r.get("lm") or r.get("commonsense") for r in rows.values()):
        parts += ["## Language modeling and commonsense reasoning", "", paper_table(rows), ""]
        lm = lm_table(rows)
        parts += [lm, ""] if lm else []
    harness = lm_eval_table(rows)
    if harness:
        parts += ["## lm-evaluation-harness tasks", "", harness, ""]
    niah = niah_table(rows)
    if niah:
        parts += ["## Needle in a haystack (accuracy %)", "", niah, ""]
    table = recall_table(rows)
    if table:
        parts += ["## In-context recall (accuracy %: the answer in the greedy continuation)", "", table, ""]
    table = babilong_table(rows)
    if table:
        parts += [
            "## BABILong (accuracy %: the answer alone in the greedy output's first sentence)",
            "",
            table,
            "",
        ]
    table = class_incremental_summary(rows)
    if table:
        heading = "## Class-incremental learning (final average accuracy / mean forgetting, %)"
        parts += [heading, "", table, ""]
    table = mad_table(rows)
    if table:
        parts += ["## MAD synthetic tasks (accuracy %)", "", table, ""]
        winners = grid_winners(rows, "mad")
        parts += [winners, ""] if winners else []
    table = formal_table(rows)
    if table:
        n = next(
            r["train_len"] for res in rows.values() for k, r in res.get("formal", {}).items() if k[0] != "_"
        )
        heading = f"## Formal language recognition (accuracy %: lengths 1-{n}, as trained / {n + 1}-{2 * n})"
        parts += [heading, "", table, ""]
        winners = grid_winners(rows, "formal")
        parts += [winners, ""] if winners else []
    mem = memorization_table(rows)
    if mem:
        parts += ["## Test-time memorization (loss, nats/token)", "", mem, ""]
    for name, results in rows.items():
        cont = results.get("continual", {})
        if cont.get("class_incremental"):
            table = class_incremental_table(cont["class_incremental"], cont.get("class_incremental_reset"))
            parts += [f"## Class-incremental classification (accuracy %): {name}", "", table, ""]
    return "\n".join(parts)


def write_results(out_dir: str, rows: dict[str, dict], stem: str = "eval_results") -> tuple[str, str]:
    """`<stem>.json` and `<stem>.md` in out_dir for {model name: results}; returns their paths.
    The JSON of a single model is its results dict itself (what a later run of other suites extends)."""
    os.makedirs(out_dir, exist_ok=True)
    jpath, mpath = os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.md")
    with open(jpath, "w") as f:
        json.dump(next(iter(rows.values())) if len(rows) == 1 else rows, f, indent=1, default=float)
    with open(mpath, "w") as f:
        f.write(markdown_report(rows))
    return jpath, mpath
