"""Generalized Gradient Descent and Generalized Momentum (Definition 5, Eq. 59-60 of the paper).

GGD (Eq. 59): ``W_{t+1} = argmin_W L~(x_t, u_t) + Ret(W, {W_i}_{i=t-c+1..t})``, the values
``u_t = f_{W_t}(x_t)`` self-generated (Eq. 60). The concrete, closed-form member implemented here
keeps GD's objective (Eq. 55: the dot product with the self-generated value ``u_t = -grad_y L``,
i.e. ``<W, g_t>`` in weight space) and makes the retention a proximal term on each of the last ``c``
iterates, with weights ``lambda_0..lambda_{c-1}`` (newest first, normalised to sum 1)::

    W_{t+1} = argmin_W <W, g_t> + sum_k lambda_k / (2 eta) ||W - W_{t-k}||^2
            = sum_k lambda_k W_{t-k} - eta g_t

``c = 1`` is GD (Eq. 55). As an optax transform (``W <- W - lr u``) the window is carried as the
transform's own last ``c - 1`` outputs: ``W_t - W_{t-k} = -lr sum_{j<=k} u_{t-j}``, hence::

    u_t = g_t - sum_{j=1}^{c-1} Lambda_j u_{t-j},      Lambda_j = sum_{k>=j} lambda_k

exact for a constant learning rate when nothing after this transform in the chain changes the update
(under a schedule the past displacements are counted at the current step's rate). Pulling the new
iterate back towards older ones makes this a negative-momentum (look-back) filter.

Generalized Momentum (``form='momentum'``, "adapted for the momentum term" below Eq. 60): the
memory ``m`` keeps momentum's value-less objective (Eq. 33) with the same windowed retention, each
past state decayed by ``alpha``::

    m_{t+1} = argmin_m -<m, g_t> + sum_k lambda_k / 2 ||m - alpha m_{t-k}||^2
            = alpha sum_k lambda_k m_{t-k} + g_t,        u = m_{t+1}

``c = 1`` is momentum (``optax.trace``). Both keep ``c - 1`` (GGD) or ``c`` (momentum) param-shaped
buffers.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import jax
import optax


class GeneralizedGDState(NamedTuple):
    """State of :func:`scale_by_generalized_gd`: the window, newest first (a tuple of param trees)."""

    history: tuple


def window_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """The retention weights normalised to sum 1 (newest iterate first)."""
    w = tuple(float(x) for x in weights)
    if not w or any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights!r}")
    return tuple(x / sum(w) for x in w)


def scale_by_generalized_gd(
    weights: Sequence[float] = (0.75, 0.25),
    decay=0.9,
    mu_dtype=None,
    *,
    form: Literal["gd", "momentum"] = "gd",
) -> optax.GradientTransformation:
    """GGD (``form='gd'``) or Generalized Momentum (``'momentum'``) with a retention window.

    ``weights``: the retention weight of each iterate in the window, newest first (``len`` = ``c``);
    see the module docstring for both update rules. ``decay`` (``alpha``) is used by the momentum form
    only.

    Reduces to SGD (``u = g``) for ``form='gd'`` and to ``optax.trace(decay)`` for ``'momentum'``
    with a window of one, ``weights=(1.0,)``.
    """
    if form not in ("gd", "momentum"):
        raise ValueError(f"form must be 'gd' or 'momentum', got {form!r}")
    lam = window_weights(weights)
    tails = [sum(lam[j:]) for j in range(1, len(lam))]  # Lambda_j, j = 1..c-1
    size = len(lam) - 1 if form == "gd" else len(lam)

    def init_fn(params):
        return GeneralizedGDState(
            history=tuple(optax.tree.zeros_like(params, dtype=mu_dtype) for _ in range(size))
        )

    def update_fn(updates, state, params=None):
        del params
        hist = state.history
        if form == "gd":
            out = updates
            for coef, past in zip(tails, hist):
                out = jax.tree.map(lambda u, p, c=coef: u - c * p, out, past)
            out = jax.tree.map(lambda u, g: u.astype(g.dtype), out, updates)
            new = out
        else:
            avg = jax.tree.map(lambda *ms: sum(c * m for c, m in zip(lam, ms)), *hist)
            new = jax.tree.map(lambda a, g: decay * a + g, avg, updates)
            out = jax.tree.map(lambda m, g: m.astype(g.dtype), new, updates)
        hist = (optax.tree.cast_like(new, hist[0]),) + hist[:-1] if hist else ()
        return out, GeneralizedGDState(history=hist)

    return optax.GradientTransformation(init_fn, update_fn)


def generalized_gd(
    learning_rate: optax.ScalarOrSchedule,
    weights: Sequence[float] = (0.75, 0.25),
    decay=0.9,
    mu_dtype=None,
    *,
    form: Literal["gd", "momentum"] = "gd",
) -> optax.GradientTransformation:
    """GGD (Eq. 59) with a proximal retention over the last ``len(weights)`` iterates; ``W -= lr u``.

    ``form='gd'``: ``W_{t+1} = sum_k lambda_k W_{t-k} - lr g_t``; reduces to ``optax.sgd(lr)`` with
    ``weights=(1.0,)``. ``form='momentum'``: ``m <- decay sum_k lambda_k m_{t-k} + g``; reduces to
    ``optax.sgd(lr, momentum=decay)`` with ``weights=(1.0,)``.
    """
    return optax.chain(
        scale_by_generalized_gd(weights, decay, mu_dtype, form=form),
        optax.scale_by_learning_rate(learning_rate),
    )
