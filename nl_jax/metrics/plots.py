"""The loss-curve PNG written at the end of a run (train loss per logged step, validation loss)."""

from __future__ import annotations

import math


def plot_loss_curve(rows: list[dict], path: str, title: str = "") -> str | None:
    """rows: metrics.jsonl objects; writes `path` and returns it (None when there is nothing to plot)."""
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train" and "loss" in r]
    val = [(r["step"], r["loss"]) for r in rows if r.get("split") == "eval" and "loss" in r]
    train = [(s, v) for s, v in train if math.isfinite(v)]
    val = [(s, v) for s, v in val if math.isfinite(v)]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
