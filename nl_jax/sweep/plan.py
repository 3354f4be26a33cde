"""A sweep plan: the base config and its overrides, the points, the root, and each point's commands.

Every point runs `python -m experiments.pretrain --config=NAME --workdir=ROOT/POINT --config.k=v ...`
(the base overrides first, then the point's), so a printed command, a local run and a TPU launch
train exactly the same thing. With an eval suite, `python -m experiments.evaluate` follows on the
same workdir.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Sequence

from nl_jax.sweep import grid, named, state


@dataclasses.dataclass(frozen=True)
class Plan:
    config: str  # the --config value (a name or a path), passed on as it is
    sweep: str  # the named sweep, "grid", or "NAME_grid" for a named sweep times --grid axes
    root: str  # the sweep's directory; point workdirs are ROOT/POINT
    base_overrides: tuple[tuple[str, object], ...]
    points: tuple[grid.Point, ...]
    steps: dict  # point name -> train.steps of its config (what "finished" means)
    eval_suite: str = ""  # experiments.evaluate --suite (empty: no evaluation)
    eval_args: tuple[str, ...] = ()  # further experiments.evaluate flags
    command: str = ""  # the sweep's command line, for the results' header

    def workdir(self, point: grid.Point) -> str:
        return state.join(self.root, point.name)

    def pretrain_args(self, point: grid.Point) -> list[str]:
        overrides = [*self.base_overrides, *point.overrides]
        return [
            "-m",
            "experiments.pretrain",
            f"--config={self.config}",
            f"--workdir={self.workdir(point)}",
            *(f"--config.{k}={grid.format_value(v)}" for k, v in overrides),
        ]

    def eval_args_for(self, point: grid.Point) -> list[str]:
        if not self.eval_suite:
            return []
        return [
            "-m",
            "experiments.evaluate",
            f"--workdir={self.workdir(point)}",
            f"--suite={self.eval_suite}",
            *self.eval_args,
        ]

    def shell_line(self, point: grid.Point, python: str = "python") -> str:
        """The point's command(s) as one copy-pasteable shell line."""
        line = shlex.join([python, *self.pretrain_args(point)])
        if self.eval_suite:
            line += " && " + shlex.join([python, *self.eval_args_for(point)])
        return line

    def manifest(self) -> dict:
        return {
            "config": self.config,
            "sweep": self.sweep,
            "base_overrides": [[k, v] for k, v in self.base_overrides],
            "points": [p.as_dict() for p in self.points],
            "steps": self.steps,
            "eval_suite": self.eval_suite,
            "eval_args": list(self.eval_args),
            "command": self.command,
        }


def default_root(config: str, sweep: str) -> str:
    name = os.path.splitext(os.path.basename(config.split(":", 1)[0]))[0]
    return os.path.join("runs", "sweeps", f"{name}_{sweep}")


def make_plan(
    config_arg: str,
    base_config,
    base_overrides: dict,
    *,
    sweep: str = "",
    grid_flags: Sequence[str] = (),
    root: str = "",
    eval_suite: str = "",
    eval_args: Sequence[str] = (),
    command: str = "",
) -> Plan:
    """The points of `sweep` (a named sweep, may be empty) times the `--grid` axes, checked against
    `base_config` (the config with `base_overrides` applied): every key exists, every value parses."""
    if not sweep and not grid_flags:
        raise ValueError(
            f"nothing to sweep: pass --sweep=NAME ({', '.join(named.SWEEPS)}) and/or --grid=KEY=V1,V2"
        )
    axes = (named.named_axes(sweep, base_config) if sweep else []) + grid.grid_axes(base_config, grid_flags)
    points = grid.product(axes)
    swept = {k for p in points for k, _ in p.overrides}
    both = sorted(swept & set(base_overrides))
    if both:
        raise ValueError(f"{', '.join(both)} is both set by --config.* and swept: drop one")
    steps = {}
    for p in points:
        for key, _ in p.overrides:
            grid.get_field(base_config, key)  # KeyError naming the field
        steps[p.name] = int(grid.point_config(base_config, p).train.steps)
    label = "_".join(filter(None, [sweep, "grid" if grid_flags else ""]))  # e.g. hope_ablation_grid
    return Plan(
        config=config_arg,
        sweep=label,
        root=root or default_root(config_arg, label),
        base_overrides=tuple(base_overrides.items()),
        points=tuple(points),
        steps=steps,
        eval_suite=eval_suite,
        eval_args=tuple(eval_args),
        command=command,
    )


def plan_from_manifest(root: str) -> Plan:
    """The plan of the sweep whose manifest is in `root` (for --collect without the sweep's flags)."""
    m = state.read_manifest(root)
    points = tuple(
        grid.Point(p["name"], tuple((k, _tuple(v)) for k, v in p["overrides"])) for p in m["points"]
    )
    return Plan(
        config=m["config"],
        sweep=m["sweep"],
        root=root,
        base_overrides=tuple((k, _tuple(v)) for k, v in m["base_overrides"]),
        points=points,
        steps={k: int(v) for k, v in m["steps"].items()},
        eval_suite=m.get("eval_suite", ""),
        eval_args=tuple(m.get("eval_args", ())),
        command=m.get("command", ""),
    )


def _tuple(value):
    """JSON turns tuples into lists; config tuples come back as tuples."""
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value
