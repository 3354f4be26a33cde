"""Throughput and the progress line: tokens/s, step time, ETA."""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Throughput:
    """Rates over the window since the last `report()`; compile time is excluded by starting the
    clock after the first step (`start`)."""

    def __init__(self, total_steps: int, tokens_per_step: int):
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self._t0 = self._step0 = None
        self._window_t = self._window_step = None

    def start(self, step: int) -> None:
        self._t0 = self._window_t = time.perf_counter()
        self._step0 = self._window_step = step

    @property
    def started(self) -> bool:
        return self._t0 is not None

    def report(self, step: int) -> dict:
        """{step_time_s, tokens_per_s, eta_s} over the last window (empty before `start`)."""
        if self._t0 is None or step <= self._window_step:
            return {}
        now = time.perf_counter()
        dt = (now - self._window_t) / (step - self._window_step)
        self._window_t, self._window_step = now, step
        overall = (now - self._t0) / max(step - self._step0, 1)
        return {
            "step_time_s": dt,
            "tokens_per_s": self.tokens_per_step / dt,
            "eta_s": overall * (self.total_steps - step),
        }


def progress_line(step: int, total: int, metrics: dict) -> str:
    """`step  120/600 (20%) | loss 2.3140 | gnorm 0.41 | lr 1.0e-03 | 12.3k tok/s | MFU 3.1% | ETA 2m13s`"""
    parts = [f"step {step:>{len(str(total))}}/{total} ({100 * step / max(total, 1):.0f}%)"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "eval_loss" in metrics:
        parts.append(f"val {metrics['eval_loss']:.4f}")
    if "grad_norm" in metrics:
        parts.append(f"gnorm {metrics['grad_norm']:.3g}")
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    if "tokens_per_s" in metrics:
        tps = metrics["tokens_per_s"]
        parts.append(f"{tps / 1e3:.1f}k tok/s" if tps >= 1e3 else f"{tps:.0f} tok/s")
    if metrics.get("mfu") is not None:
        parts.append(f"MFU {100 * metrics['mfu']:.2f}%")
    if "eta_s" in metrics:
        parts.append(f"ETA {format_duration(metrics['eta_s'])}")
    return " | ".join(parts)


def format_summary(s: dict) -> str:
    """The end-of-run block printed by the trainer (s: its summary dict)."""

    def f(x, fmt="{:.4f}"):
        return "-" if x is None else fmt.format(x)

    lines = [
        "-" * 78,
        f"summary: {s['config']}  steps {s['start_step']}->{s['final_step']}/{s['total_steps']}"
        + ("  (preempted)" if s["preempted"] else ""),
        f"  validation loss: {f(s['initial_eval_loss'])} -> {f(s['final_eval_loss'])} (best {f(s['best_eval_loss'])})",
        f"  final train loss: {f(s['final_train_loss'])}",
        f"  throughput: {f(s['tokens_per_s'], '{:,.0f}')} tokens/s, MFU {f(s['mfu'] and 100 * s['mfu'], '{:.2f}%')}",
        f"  checkpoints: {s['checkpoints']}   loss curve: {s['loss_curve']}",
        f"  wall time: {format_duration(s['wall_time_s'])}",
        "-" * 78,
    ]
    return "\n".join(lines)
