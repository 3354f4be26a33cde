"""Models: a registry by name, the scan-over-layers stack, Transformer++ and (later) HOPE et al."""

from nl_jax.models.registry import build_model, count_params, get_model_class, register, registered_models
from nl_jax.models.stack import REMAT_POLICIES, Stack, get_remat_policy

__all__ = [
    "build_model",
    "count_params",
    "get_model_class",
    "register",
    "registered_models",
    "REMAT_POLICIES",
    "Stack",
    "get_remat_policy",
]
