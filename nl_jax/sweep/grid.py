"""Sweep points: `key=v1,v2` grid axes typed by the config, their cartesian product, stable names.

An axis is a tuple of `Option`s; an option sets one or more config fields together (a CMS level
count sets `periods`, `hidden` and `inner_lr` at once). A `--grid=config.optim.lr=1e-3,3e-3` flag is
an axis of one-field options; a named sweep (`named.py`) is a list of axes. The product of the axes
gives the points, in order, each with a name that is also its workdir under the sweep's root.

Values are parsed with the parser ml_collections uses for `--config.a.b=v` of the field's type, so
what is validated here is exactly what the pretrain command will parse.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import itertools
import re
from collections.abc import Sequence
from typing import Any

from absl import flags
from ml_collections.config_flags import tuple_parser


@dataclasses.dataclass(frozen=True)
class Option:
    """One value of an axis: `label` names it, `overrides` is ((key, value), ...) with dotted keys
    relative to the config ("optim.lr")."""

    label: str
    overrides: tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep: its name (= workdir under the sweep root) and its overrides in order."""

    name: str
    overrides: tuple[tuple[str, Any], ...]

    def as_dict(self) -> dict:
        return {"name": self.name, "overrides": [[k, v] for k, v in self.overrides]}


def strip_prefix(key: str) -> str:
    """ "config.optim.lr" and "optim.lr" both name the field optim.lr."""
    key = key.strip()
    return key[len("config.") :] if key.startswith("config.") else key


def _leaf_keys(config, prefix: str = "") -> list[str]:
    out = []
    for k, v in config.items():
        path = f"{prefix}{k}"
        out.extend(_leaf_keys(v, path + ".") if hasattr(v, "items") else [path])
    return out


def get_field(config, key: str):
    """The value at dotted `key`; a KeyError naming the key and its close matches."""
    node = config
    for part in key.split("."):
        if not hasattr(node, "items") or part not in node:
            close = difflib.get_close_matches(key, _leaf_keys(config), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"the config has no field {key!r}.{hint}")
        node = node[part]
    if hasattr(node, "items"):
        raise KeyError(f"{key!r} is a config section, not a field: sweep one of its fields")
    return node


def set_field(config, key: str, value) -> None:
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    with node.ignore_type():  # a None default may take any value, as on the command line
        node[last] = value


def parse_value(config, key: str, text: str):
    """`text` as a value of the field `key`, with the parser ml_collections uses for that type."""
    current = get_field(config, key)
    try:
        if isinstance(current, bool):
            return flags.BooleanParser().parse(text)
        if isinstance(current, int):
            return flags.IntegerParser().parse(text)
        if isinstance(current, float):
            return flags.FloatParser().parse(text)
        if isinstance(current, str):  # quotes only protect commas: "'a,b'" is a,b
            quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
            return text[1:-1] if quoted else text
        if isinstance(current, tuple):
            return tuple_parser.TupleParser().parse(text)
    except ValueError as e:
        raise ValueError(f"{key}={text!r}: not a valid {type(current).__name__} ({e})") from None
    try:  # None or another type: a Python literal, else a string (ml_collections' literal parser)
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text


def format_value(value) -> str:
    """The command-line form of `value` (what `--config.a.b=` parses back to the same value)."""
    if isinstance(value, tuple):
        inner = ",".join(format_value(v) if not isinstance(v, str) else repr(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def split_values(text: str) -> list[str]:
    """ "a,b,(1,2)" -> ["a", "b", "(1,2)"]: commas inside brackets or quotes do not split."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    if depth or quote or any(not p for p in parts):
        raise ValueError(f"cannot split {text!r} into values: unbalanced brackets/quotes or an empty value")
    return parts


def parse_grid_flag(config, text: str) -> tuple[str, list]:
    """ "config.model.cms.signal=ntp,local,none" -> ("model.cms.signal", ["ntp", "local", "none"])."""
    if "=" not in text:
        raise ValueError(f"--grid={text!r}: expected KEY=V1,V2,... (e.g. config.optim.lr=1e-3,3e-3)")
    key, values = text.split("=", 1)
    key = strip_prefix(key)
    parsed = [parse_value(config, key, v) for v in split_values(values)]
    if len(set(map(repr, parsed))) != len(parsed):
        raise ValueError(f"--grid={text!r}: a value is repeated")
    return key, parsed


def slug(value) -> str:
    """A path-safe rendering of a value: (16, 64) -> "16-64", 0.001 -> "0.001"."""
    text = format_value(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "empty"


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each key's shortest dotted suffix that no other key shares: optim.lr -> lr, but
    model.cms.hidden and model.memory.hidden stay cms.hidden and memory.hidden."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out[key] = suffix
    return out


def grid_axes(config, grid_flags: Sequence[str]) -> list[tuple[Option, ...]]:
    """One axis per `--grid` flag; options labelled "<short key>=<value>"."""
    parsed = [parse_grid_flag(config, g) for g in grid_flags]
    names = short_keys([k for k, _ in parsed])
    return [tuple(Option(f"{names[k]}={slug(v)}", ((k, v),)) for v in values) for k, values in parsed]


def product(axes: Sequence[Sequence[Option]]) -> list[Point]:
    """The cartesian product of the axes (the first axis varies slowest), as named points.

    A key set by two axes is an error; names that collide after making them path-safe get a short
    hash of their overrides, so distinct points never share a workdir."""
    seen: dict[str, int] = {}
    for i, axis in enumerate(axes):
        if not axis:
            raise ValueError(f"sweep axis {i} has no values")
        for key in {k for opt in axis for k, _ in opt.overrides}:
            if key in seen and seen[key] != i:
                raise ValueError(f"{key} is swept by two axes: sweep it in one")
            seen[key] = i
    points = []
    for combo in itertools.product(*axes):
        overrides = tuple(kv for opt in combo for kv in opt.overrides)
        name = "__".join(re.sub(r"[^A-Za-z0-9._=+-]+", "-", opt.label) for opt in combo)
        points.append(Point(name or "base", overrides))
    counts: dict[str, int] = {}
    for p in points:
        counts[p.name] = counts.get(p.name, 0) + 1
    if len(counts) == len(points):
        return points

    def digest(p: Point) -> str:
        return hashlib.sha1(repr(p.overrides).encode()).hexdigest()[:6]

    return [Point(f"{p.name}__{digest(p)}", p.overrides) if counts[p.name] > 1 else p for p in points]


def point_config(base, point: Point):
    """A copy of `base` with the point's overrides applied."""
    config = base.copy_and_resolve_references()
    for key, value in point.overrides:
        set_field(config, key, value)
    return config
