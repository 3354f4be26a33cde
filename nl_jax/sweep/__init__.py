"""Ablation sweeps: a base config times a grid of `--config.*` overrides, run locally in sequence,
printed as commands, or launched on TPU slices; one results table and plots (experiments/sweep.py).

    plan = make_plan("hope_tiny", config, {}, sweep="hope_ablation")
    run_local(plan); collect(plan)
"""

from nl_jax.sweep.results import collect
from nl_jax.sweep.grid import Option, Point, grid_axes, parse_grid_flag, product
from nl_jax.sweep.named import SWEEPS, named_axes
from nl_jax.sweep.plan import Plan, make_plan, plan_from_manifest
from nl_jax.sweep.runner import launch_commands, point_status, print_commands, run_launch, run_local

__all__ = [
    "collect",
    "Option",
    "Point",
    "grid_axes",
    "parse_grid_flag",
    "product",
    "SWEEPS",
    "named_axes",
    "Plan",
    "make_plan",
    "plan_from_manifest",
    "launch_commands",
    "point_status",
    "print_commands",
    "run_launch",
    "run_local",
]
