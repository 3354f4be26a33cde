"""Deep optimizers of Nested Learning as optax transforms (docs/design.md, Decision 9).

Each optimizer is a ``scale_by_<name>`` transform (NamedTuple state) and a chained alias
``<name>(learning_rate, ...)`` ending in ``optax.scale_by_learning_rate`` (float or schedule)::

    from nl_jax import optim
    tx = optim.m3(1e-3)                     # or momentum_memory, delta_momentum, delta_gd, ...
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)

For a training run, ``make_optimizer(cfg.optim, total_steps)`` builds ``(tx, schedule)`` from the config
(clipping, any of the above or AdamW by name, warm-up + cosine / WSD, decoupled weight decay).

Matrix optimizers take ``dims`` (:class:`MatrixDims`, a pytree of them, or a callable) saying which
axes of each parameter form the matrix; by default the last two, with leading axes as batch
(scanned layers), and vectors / scalars use each optimizer's documented fallback.
"""

from nl_jax.optim.adagrad_memory import AdagradMemoryState
from nl_jax.optim.adagrad_memory import adagrad_memory
from nl_jax.optim.adagrad_memory import scale_by_adagrad_memory
from nl_jax.optim.adam_memory import AdamMemoryState
from nl_jax.optim.adam_memory import adam_memory
from nl_jax.optim.adam_memory import scale_by_adam_memory
from nl_jax.optim.deep_momentum import DeepMomentumState
from nl_jax.optim.deep_momentum import MomentumMLP
from nl_jax.optim.deep_momentum import deep_momentum
from nl_jax.optim.deep_momentum import scale_by_deep_momentum
from nl_jax.optim.delta_gd import DeltaGDState
from nl_jax.optim.delta_gd import delta_gd
from nl_jax.optim.delta_gd import scale_by_delta_gd
from nl_jax.optim.delta_momentum import DeltaMomentumState
from nl_jax.optim.delta_momentum import delta_momentum
from nl_jax.optim.delta_momentum import scale_by_delta_momentum
from nl_jax.optim.feature_momentum import feature_momentum
from nl_jax.optim.feature_momentum import scale_by_feature_momentum
from nl_jax.optim.generalized import GeneralizedGDState
from nl_jax.optim.generalized import generalized_gd
from nl_jax.optim.generalized import scale_by_generalized_gd
from nl_jax.optim.m3 import M3State
from nl_jax.optim.m3 import m3
from nl_jax.optim.m3 import scale_by_m3
from nl_jax.optim.matrix import MatrixDims
from nl_jax.optim.momentum import MomentumMemoryState
from nl_jax.optim.momentum import PreconditionedMomentumState
from nl_jax.optim.momentum import momentum_memory
from nl_jax.optim.momentum import preconditioned_momentum
from nl_jax.optim.momentum import scale_by_momentum_memory
from nl_jax.optim.momentum import scale_by_preconditioned_momentum
from nl_jax.optim.newton_schulz import anchored_newton_schulz
from nl_jax.optim.newton_schulz import muon
from nl_jax.optim.newton_schulz import newton_schulz
from nl_jax.optim.newton_schulz import orthogonalize
from nl_jax.optim.newton_schulz import scale_by_newton_schulz
from nl_jax.optim import schedules
from nl_jax.optim.factory import make_optimizer

__all__ = [
    "AdagradMemoryState",
    "AdamMemoryState",
    "DeepMomentumState",
    "DeltaGDState",
    "DeltaMomentumState",
    "GeneralizedGDState",
    "M3State",
    "MatrixDims",
    "MomentumMLP",
    "MomentumMemoryState",
    "PreconditionedMomentumState",
    "adagrad_memory",
    "adam_memory",
    "anchored_newton_schulz",
    "deep_momentum",
    "delta_gd",
    "delta_momentum",
    "feature_momentum",
    "generalized_gd",
    "m3",
    "momentum_memory",
    "muon",
    "newton_schulz",
    "orthogonalize",
    "preconditioned_momentum",
    "scale_by_adagrad_memory",
    "scale_by_adam_memory",
    "scale_by_deep_momentum",
    "scale_by_delta_gd",
    "scale_by_delta_momentum",
    "scale_by_feature_momentum",
    "scale_by_generalized_gd",
    "scale_by_m3",
    "scale_by_momentum_memory",
    "scale_by_newton_schulz",
    "scale_by_preconditioned_momentum",
    "make_optimizer",
    "schedules",
]
