"""Models: a registry by name, the language-model shell and its interface, the scan-over-layers stack,
and the models built on them (Transformer++, HOPE, Titans, DLA, Memora, TTT, Samba, RetNet, (Gated)
DeltaNet, Comba, RWKV-7)."""

from nl_jax.models.interface import CausalModel, StatefulModel
from nl_jax.models.lm import CausalLM
from nl_jax.models.registry import (
    DOCUMENT_BOUNDARIES,
    build_model,
    check_document_boundaries,
    count_params,
    get_model_class,
    register,
    registered_models,
)
from nl_jax.models.stack import REMAT_POLICIES, Stack, get_remat_policy

__all__ = [
    "DOCUMENT_BOUNDARIES",
    "build_model",
    "check_document_boundaries",
    "CausalLM",
    "CausalModel",
    "count_params",
    "get_model_class",
    "register",
    "registered_models",
    "REMAT_POLICIES",
    "Stack",
    "StatefulModel",
    "get_remat_policy",
]
