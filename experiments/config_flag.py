"""`--config`, shared by the experiments commands: a config name (experiments/configs/NAME.py) or a
path, with ml_collections' `--config.a.b=v` overrides.

    from experiments import config_flag
    _CONFIG = config_flag.define()
    ...
    config, name = _CONFIG.value, config_flag.name()
"""

import os

from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from experiments import configs


class NamedConfigParser(ConfigFileFlagParser):
    """`--config=NAME` -> experiments.configs.load(NAME) (close matches on a typo); a value with a
    `/` or ending in `.py` is read as a file path, like ml_collections does."""

    last_value = None

    def parse(self, value):
        NamedConfigParser.last_value = value
        if value.endswith(".py") or "/" in value.split(":", 1)[0]:
            return super().parse(value)
        config = configs.load(value)  # ValueError listing the close matches
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
    flag_values["config"].parser = NamedConfigParser(name="config")
    return holder


def name() -> str:
    """The run's name: the config name given, or a config file's stem ("run" before parsing)."""
    value = NamedConfigParser.last_value or "run"
    return os.path.splitext(os.path.basename(value.split(":", 1)[0]))[0]
