"""Training: train state, train/eval steps, the loop with hooks, orbax checkpointing.

from nl_jax.train import run
summary = run(config, workdir="runs/transformer_tiny", config_name="transformer_tiny")
"""

from nl_jax.train.checkpoint import Checkpointer, restore_params
from nl_jax.train.loop import Hook, check_config, run
from nl_jax.train.state import ModelFn, abstract_train_state, init_train_state, state_shardings_for
from nl_jax.train.step import NonFiniteLossError, make_eval_step, make_train_step, token_nll

__all__ = [
    "Checkpointer",
    "restore_params",
    "Hook",
    "NonFiniteLossError",
    "check_config",
    "run",
    "ModelFn",
    "abstract_train_state",
    "init_train_state",
    "state_shardings_for",
    "make_eval_step",
    "make_train_step",
    "token_nll",
]
