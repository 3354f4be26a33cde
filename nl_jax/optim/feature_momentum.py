"""Momentum with a higher-order feature map of the gradient (Eq. 51 of the paper).

``m_{i+1} = alpha m_i - eta P_i phi(g_i)``: the keys of the momentum memory go through a feature map
``phi`` before the (optional) preconditioner ``P``, as higher-order feature maps do for the keys of a
linear-attention memory. Here ``phi`` is an element-wise polynomial ``phi(g) = sum_k c_k g^k``
(``coeffs = (c_1, c_2, ...)``); the default ``g + g^3`` is odd, so it keeps the gradient's sign and
stresses its large entries. The polynomial is not scale-free: the cubic term matters only where
``|g|`` is of order ``1/sqrt(c_3)`` or more, so scale ``coeffs`` with the gradients.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import optax

from nl_jax.optim.momentum import resolve_preconditioner, scale_by_preconditioned_momentum


def polynomial(x: jax.Array, coeffs: Sequence[float]) -> jax.Array:
    """``sum_k coeffs[k-1] x^k`` (Horner); ``coeffs=(1.0,)`` returns ``x`` unchanged."""
    coeffs = tuple(coeffs)
    if not coeffs:
        raise ValueError("coeffs must hold at least the linear coefficient")
    if coeffs == (1.0,):
        return x
    acc = coeffs[-1]
    for c in reversed(coeffs[:-1]):
        acc = acc * x + c
    return (acc * x).astype(x.dtype)


def scale_by_feature_momentum(
    decay=0.9,
    inner_lr=1.0,
    coeffs: Sequence[float] = (1.0, 0.0, 1.0),
    preconditioner: Optional[optax.GradientTransformation] = None,
    mu_dtype=None,
) -> optax.GradientTransformation:
    """Momentum on higher-order features of the gradient (Eq. 51).

    ``m <- decay m + inner_lr P(phi(g))``, ``u = m``, with ``phi`` the element-wise polynomial of
    ``coeffs`` (module docstring) applied to the gradient, before ``P`` (default identity; any
    ``optax.GradientTransformation``).

    Reduces to ``optax.trace(decay)`` exactly with ``coeffs=(1.0,)`` (``phi`` the identity),
    ``inner_lr=1`` and ``P`` the identity.
    """
    coeffs = tuple(float(c) for c in coeffs)
    features = optax.stateless_with_tree_map(lambda g, _: polynomial(g, coeffs))
    # Preconditioned momentum whose P first takes the features: the state is its
    # PreconditionedMomentumState, the preconditioner part holding (features, P)'s states.
    precond = optax.chain(features, resolve_preconditioner(preconditioner))
    return scale_by_preconditioned_momentum(decay, inner_lr, precond, mu_dtype)


def feature_momentum(
    learning_rate: optax.ScalarOrSchedule,
    decay=0.9,
    inner_lr=1.0,
    coeffs: Sequence[float] = (1.0, 0.0, 1.0),
    preconditioner: Optional[optax.GradientTransformation] = None,
    mu_dtype=None,
) -> optax.GradientTransformation:
    """Momentum SGD on features of the gradient (Eq. 51): ``m <- decay m + P(phi(g))``; ``W -= lr m``.

    Reduces to ``optax.sgd(learning_rate, momentum=decay)`` exactly with ``coeffs=(1.0,)``.
    """
    return optax.chain(
        scale_by_feature_momentum(decay, inner_lr, coeffs, preconditioner, mu_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )
