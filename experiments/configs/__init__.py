"""Named configs: `experiments/configs/NAME.py` defines `get_config()`; `load(NAME)` returns it.

Modules named `base` or ending in `_base` hold shared defaults and are not runnable configs.
"""

import difflib
import importlib
import pkgutil

import ml_collections


def names() -> tuple[str, ...]:
    """Every runnable config name, sorted."""
    found = (m.name for m in pkgutil.iter_modules(__path__))
    return tuple(sorted(n for n in found if n != "base" and not n.endswith("_base")))


def load(name: str) -> ml_collections.ConfigDict:
    """The config `name`; an unknown name is a ValueError listing the close matches."""
    available = names()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown config {name!r}.{hint} Available: {', '.join(available)}")
    return importlib.import_module(f"{__name__}.{name}").get_config()
