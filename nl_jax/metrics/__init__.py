"""Metrics: TensorBoard, JSON-lines and W&B writers, FLOPs/MFU, throughput/ETA, profiler window, plots."""

from nl_jax.metrics.flops import (
    PEAK_FLOPS,
    estimate_forward_flops_per_token,
    forward_flops_per_token,
    mfu,
    peak_flops_per_device,
    train_flops_per_token,
)
from nl_jax.metrics.plots import plot_loss_curve
from nl_jax.metrics.profiler import ProfilerWindow
from nl_jax.metrics.progress import Throughput, format_duration, format_summary, progress_line
from nl_jax.metrics.writers import (
    JsonlWriter,
    MetricWriter,
    TensorBoardWriter,
    WandbWriter,
    import_wandb,
    read_events,
    read_jsonl,
)

__all__ = [
    "PEAK_FLOPS",
    "estimate_forward_flops_per_token",
    "forward_flops_per_token",
    "mfu",
    "peak_flops_per_device",
    "train_flops_per_token",
    "plot_loss_curve",
    "ProfilerWindow",
    "Throughput",
    "format_duration",
    "format_summary",
    "progress_line",
    "JsonlWriter",
    "MetricWriter",
    "TensorBoardWriter",
    "WandbWriter",
    "import_wandb",
    "read_events",
    "read_jsonl",
]
