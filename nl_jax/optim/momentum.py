"""Momentum as an associative memory (Eq. 33 of the paper) and preconditioned momentum (Eq. 46-47).

Sign convention (all of ``nl_jax.optim``, as in optax): a ``scale_by_*`` transform returns a
*descent direction* ``u`` and the alias ends with ``optax.scale_by_learning_rate(lr)``, which applies
``W <- W - lr u``. The paper's momentum ``m_paper`` (``W <- W + m_paper``) is ``-lr * m`` here when
the learning rate is constant.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import optax


class MomentumMemoryState(NamedTuple):
    """State of :func:`scale_by_momentum_memory`: the memory ``m`` (one per parameter)."""

    mu: optax.Updates


def scale_by_momentum_memory(
    decay=0.9, inner_lr=1.0, nesterov: bool = False, mu_dtype=None
) -> optax.GradientTransformation:
    """Momentum as a value-less associative memory (Eq. 33).

    The memory ``m`` minimises the value-less objective ``L(m) = -<m, g_i>`` (``<m g_i^T, I>`` in the
    paper's sign) with retention ``decay``; one inner gradient step of size ``inner_lr`` gives
    ``m_{i+1} = decay * m_i + inner_lr * g_i`` and the update is ``u = m_{i+1}``
    (``nesterov``: ``u = inner_lr * g_i + decay * m_{i+1}``). ``decay < 1`` is the l2 retention of
    the memory; ``inner_lr = 1 - decay`` gives an EMA.

    Reduces to ``optax.trace(decay, nesterov)`` (exactly) when ``inner_lr == 1``.
    """

    def init_fn(params):
        return MomentumMemoryState(mu=optax.tree.zeros_like(params, dtype=mu_dtype))

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: decay * m + inner_lr * g, updates, state.mu)
        if nesterov:
            out = jax.tree.map(lambda g, m: (inner_lr * g + decay * m).astype(g.dtype), updates, mu)
        else:
            out = jax.tree.map(lambda g, m: m.astype(g.dtype), updates, mu)
        return out, MomentumMemoryState(mu=optax.tree.cast_like(mu, state.mu))

    return optax.GradientTransformation(init_fn, update_fn)


def momentum_memory(
    learning_rate: optax.ScalarOrSchedule, decay=0.9, inner_lr=1.0, nesterov: bool = False, mu_dtype=None
) -> optax.GradientTransformation:
    """SGD whose momentum is a value-less associative memory (Eq. 33).

    ``m <- decay m + inner_lr g``; ``W <- W - lr m``.
    Reduces to ``optax.sgd(learning_rate, momentum=decay, nesterov=nesterov)`` exactly (bitwise)
    when ``inner_lr == 1`` (tests/optim/test_reductions.py).
    """
    return optax.chain(
        scale_by_momentum_memory(decay, inner_lr, nesterov, mu_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )


def resolve_preconditioner(
    preconditioner: Optional[optax.GradientTransformation],
) -> optax.GradientTransformation:
    """``None`` -> ``optax.identity()``; otherwise it must be an ``optax.GradientTransformation``.

    A plain function ``g -> P(g)`` can be given as ``optax.stateless_with_tree_map(
    lambda g, _: P(g))``; plain callables are refused because ``optax.inject_hyperparams`` would
    mistake them for schedules.
    """
    if preconditioner is None:
        return optax.identity()
    if not isinstance(preconditioner, optax.GradientTransformation):
        raise TypeError(
            "preconditioner must be an optax.GradientTransformation (wrap a function "
            "with optax.stateless_with_tree_map), got " + repr(type(preconditioner))
        )
    return preconditioner


def default_preconditioner() -> optax.GradientTransformation:
    """RMS preconditioner ``P g = g / (sqrt(EMA_0.999(g^2) debiased) + 1e-8)``."""
    return optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False, bias_correction=True)


class PreconditionedMomentumState(NamedTuple):
    """State of :func:`scale_by_preconditioned_momentum`."""

    mu: optax.Updates
    preconditioner: optax.OptState


def scale_by_preconditioned_momentum(
    decay=0.9,
    inner_lr=1.0,
    preconditioner: Optional[optax.GradientTransformation] = None,
    mu_dtype=None,
) -> optax.GradientTransformation:
    """Momentum with a more expressive association (Eq. 46-47).

    Objective ``L(m) = -<m, P_i g_i>`` gives ``m_{i+1} = decay m_i + inner_lr P_i(g_i)``, ``u = m``.
    ``P`` is pluggable: any ``optax.GradientTransformation`` (stateful ones such as
    ``optax.scale_by_rms`` keep their state inside this one). ``preconditioner=None`` uses
    :func:`default_preconditioner` (RMS).

    Reduces to :func:`scale_by_momentum_memory` with ``P = optax.identity()``, and
    ``chain(this(decay, P=optax.scale_by_rms(...)), scale_by_learning_rate(lr))`` is exactly
    ``optax.rmsprop(lr, ..., momentum=decay)``.
    """
    precond = default_preconditioner() if preconditioner is None else resolve_preconditioner(preconditioner)
    memory = scale_by_momentum_memory(decay, inner_lr, False, mu_dtype)

    def init_fn(params):
        return PreconditionedMomentumState(mu=memory.init(params).mu, preconditioner=precond.init(params))

    def update_fn(updates, state, params=None):
        pg, pstate = precond.update(updates, state.preconditioner, params)
        out, mstate = memory.update(pg, MomentumMemoryState(state.mu), params)
        return out, PreconditionedMomentumState(mu=mstate.mu, preconditioner=pstate)

    return optax.GradientTransformation(init_fn, update_fn)


def preconditioned_momentum(
    learning_rate: optax.ScalarOrSchedule,
    decay=0.9,
    inner_lr=1.0,
    preconditioner: Optional[optax.GradientTransformation] = None,
    mu_dtype=None,
) -> optax.GradientTransformation:
    """Preconditioned momentum SGD (Eq. 46-47): ``m <- decay m + inner_lr P(g)``; ``W <- W - lr m``.

    Default ``P`` is the RMS preconditioner (:func:`default_preconditioner`). Reduces to
    ``optax.rmsprop(lr, decay=d, eps=e, eps_in_sqrt=s, bias_correction=b, momentum=decay)`` exactly
    with ``preconditioner=optax.scale_by_rms(d, e, eps_in_sqrt=s, bias_correction=b)``, and to
    ``optax.sgd(lr, momentum=decay)`` with ``preconditioner=optax.identity()`` (``inner_lr=1``).
    """
    return optax.chain(
        scale_by_preconditioned_momentum(decay, inner_lr, preconditioner, mu_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )
