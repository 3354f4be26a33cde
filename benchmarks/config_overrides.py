"""`--override key=value` flags of the benchmarks, applied to an ml_collections config."""

from __future__ import annotations

import ast


def parse_value(text: str):
    """A --override value: a python literal (numbers, bools, tuples) or else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(items) -> dict:
    """["model.cms.signal=ntp", ...] -> {"model.cms.signal": "ntp", ...}."""
    return {k: parse_value(v) for k, v in (item.split("=", 1) for item in items)}


def apply_overrides(config, overrides: dict):
    """Sets dotted fields ("model.cms.signal") of `config`; an unknown field is an error."""
    for key, value in overrides.items():
        *path, field = key.split(".")
        section = config
        for part in path:
            section = section[part]
        if field not in section:
            raise ValueError(f"unknown config field {key!r}")
        section[field] = tuple(value) if isinstance(section[field], tuple) else value  # json has no tuples
    return config
