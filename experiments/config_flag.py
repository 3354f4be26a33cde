"""`--config`, shared by the experiments commands: a config name (experiments/configs/NAME.py), a
path to a config file, or a run's saved `config.json` (what `pretrain` and `convert` write in a
workdir), with ml_collections' `--config.a.b=v` overrides.

    from experiments import config_flag
    _CONFIG = config_flag.define()
    ...
    config, name = _CONFIG.value, config_flag.name()
"""

import importlib.util
import json
import os
import re
import sys

from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from experiments import configs


def _load_file(value: str):
    """get_config() of a config file `PATH[:ARG]`, every failure a ValueError naming the file."""
    path, *args = value.split(":", 1)
    if not os.path.isfile(path):
        raise ValueError(
            f"config file {path!r} does not exist (--config takes a name, one of experiments/configs, "
            "or the path of a .py file defining get_config())"
        )
    try:
        spec = importlib.util.spec_from_file_location("nl_jax_config_file", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(f"config file {path}, line {e.lineno}: {e.msg}") from e
    except Exception as e:
        raise ValueError(f"config file {path} fails to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config()")
    try:
        return module.get_config(*args)
    except Exception as e:
        raise ValueError(f"config file {path}: get_config() failed: {type(e).__name__}: {e}") from e


def _load_json(path: str):
    """A run's saved config (`<workdir>/config.json`) as a ConfigDict."""
    import ml_collections

    from nl_jax.eval.restore import upgrade_saved_config

    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(upgrade_saved_config(json.load(f)))
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {path}, line {e.lineno}: {e.msg}") from e


def _check_overrides(config, argv) -> None:
    """Every `--config.a.b=v` names a field of `config` (ml_collections would fail later with a
    traceback); the error suggests the close field names."""
    for arg in argv:
        m = re.match(r"--?(?:no)?config\.([^=]+)", arg)
        if not m:
            continue
        try:
            config_path.get_type(m.group(1), config)
        except (KeyError, AttributeError, IndexError, ValueError) as e:
            from nl_jax.sweep.grid import get_field

            try:
                get_field(config, m.group(1))
                why = str(e)
            except KeyError as missing:
                why = missing.args[0]
            raise ValueError(f"{arg.split('=', 1)[0]}: {why}") from None


class NamedConfigParser(ConfigFileFlagParser):
    """`--config=NAME` -> experiments.configs.load(NAME) (close matches on a typo); a value with a
    `/` or ending in `.py` is read as a file path, like ml_collections does, one ending in `.json` as
    a saved run config. The overrides on the command line are checked against the loaded config."""

    last_value = None

    def __init__(self, name, sys_argv=None):
        super().__init__(name=name)
        self._sys_argv = sys_argv

    def parse(self, value):
        NamedConfigParser.last_value = value
        if value.endswith(".json"):
            config = _load_json(value)
        elif value.endswith(".py") or "/" in value.split(":", 1)[0]:
            config = _load_file(value)
        else:
            config = configs.load(value)  # ValueError listing the close matches
        _check_overrides(config, sys.argv if self._sys_argv is None else self._sys_argv)
        config.lock()
        return config


def define(
    flag_values=flags.FLAGS, sys_argv=None, help_text="config name (experiments/configs/NAME.py) or path"
):
    """Defines `--config` in `flag_values` and returns its holder. `sys_argv`: the command line to
    find the `--config.a.b=v` overrides in (default sys.argv)."""
    holder = config_flags.DEFINE_config_file(
        "config", None, help_text, flag_values=flag_values, sys_argv=sys_argv
    )
    flag_values["config"].parser = NamedConfigParser(name="config", sys_argv=sys_argv)
    return holder


def name() -> str:
    """The run's name: the config name given, a config file's stem, the directory of a saved
    config.json ("run" before parsing)."""
    value = NamedConfigParser.last_value or "run"
    if value.endswith(".json"):
        return os.path.basename(os.path.dirname(os.path.abspath(value)))
    return os.path.splitext(os.path.basename(value.split(":", 1)[0]))[0]
