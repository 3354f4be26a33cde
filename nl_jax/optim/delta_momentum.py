"""Delta momentum (Eq. 48-49 of the paper): momentum with an L2 objective, i.e. gradient-dependent decay."""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from nl_jax.optim import matrix
from nl_jax.optim.momentum import resolve_preconditioner


class DeltaMomentumState(NamedTuple):
    """State of :func:`scale_by_delta_momentum`."""

    mu: optax.Updates
    preconditioner: optax.OptState


FORMS = ("normalized", "literal")


def delta_step(m: jax.Array, g: jax.Array, pg: jax.Array, decay, beta, form="normalized") -> jax.Array:
    """One delta-momentum step on a batch of matrices ``(b, n_in, n_out)`` (float32 math).

    ``m <- (decay I - c G G^T) m + P(g)`` with ``c = beta / ||G||_F^2`` (``form='normalized'``, one
    ``||G||_F`` per batch element) or ``c = beta`` (``'literal'``, the raw Gram of Eq. 49). The
    product is taken in the cheaper order: ``G (G^T m)`` when ``n_out <= n_in``, else ``(G G^T) m``.
    """
    if form == "literal":
        coef = beta
    else:
        sq = jnp.sum(jnp.square(g), axis=(-2, -1), keepdims=True)
        coef = beta / jnp.maximum(sq, jnp.finfo(jnp.float32).tiny)
    gt = jnp.swapaxes(g, -1, -2)
    if g.shape[-1] <= g.shape[-2]:
        proj = g @ (gt @ m)
    else:
        proj = (g @ gt) @ m
    return decay * m - coef * proj + pg


def scale_by_delta_momentum(
    decay=0.9,
    beta=0.5,
    preconditioner: Optional[optax.GradientTransformation] = None,
    mu_dtype=None,
    *,
    form: Literal["normalized", "literal"] = "normalized",
    dims: matrix.DimsSpec = None,
) -> optax.GradientTransformation:
    """Delta momentum, the right-multiplied arXiv form (Eq. 48-49).

    Paper: ``m_{i+1} = m_i (alpha I - g_i^T g_i) - eta P_i g_i`` (``m, g``: ``d_out x d_in``). Here a
    weight is viewed as ``(n_in, n_out)`` matrices (``y = x @ W``, :mod:`nl_jax.optim.matrix`), which
    is the paper's transpose, so the same rule reads ``M <- (alpha I - c G G^T) M + P(G)`` with the
    ``n_in x n_in`` Gram ``G G^T`` (= the paper's ``g^T g``) on the input side.

    ``form='literal'`` is Eq. 49 as written: ``c = beta`` on the raw Gram, and ``beta = 1`` is the
    paper's ``m (alpha I - g^T g)`` exactly. Its decay operator has eigenvalues
    ``alpha - beta s_k^2`` (``s_k`` the singular values of ``G``), so it is stable only while
    ``beta ||G||_2^2 <= 1 + alpha``: scale ``beta`` with the gradients.

    ``form='normalized'`` (default): the raw ``g^T g`` has the scale of ``||g||^2`` and makes the
    recursion unstable for large gradients, so it is normalised: ``c = beta / ||G||_F^2`` (per
    matrix). The two forms agree when ``||G||_F = 1``. The normalised decay operator
    ``alpha I - beta G G^T/||G||_F^2`` then has its spectrum in ``[alpha - beta, alpha]``: stable for
    ``0 <= beta <= alpha <= 1``. It is the gradient-dependent decay: momentum is erased (by up to
    ``beta``) along the input directions the current gradient occupies, most along its dominant ones,
    which lets momentum stop when the gradient turns. ``P`` is a pluggable
    ``optax.GradientTransformation`` (default identity).

    Vectors and scalars are viewed as one ``n x 1`` column, for which ``G G^T/||G||^2 = g g^T/||g||^2``:
    ``m <- alpha m - beta g <g, m>/||g||^2 + P(g)`` (removes ``beta`` of the momentum's component along
    ``g``; a scalar simply decays by ``alpha - beta`` when its gradient is non-zero); the literal form
    drops the ``1/||g||^2``.

    Reduces to :func:`~nl_jax.optim.scale_by_momentum_memory` / ``optax.trace(decay)`` exactly when
    ``beta == 0`` and ``P`` is the identity (either form).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    precond = resolve_preconditioner(preconditioner)

    def init_fn(params):
        return DeltaMomentumState(
            mu=optax.tree.zeros_like(params, dtype=mu_dtype), preconditioner=precond.init(params)
        )

    def update_fn(updates, state, params=None):
        pg, pstate = precond.update(updates, state.preconditioner, params)
        dims_list = matrix.leaf_dims(dims, updates)

        def one(d, g, p, m):
            view = matrix.matrix_view(g.shape, d)
            f32 = jnp.promote_types(m.dtype, jnp.float32)
            new = delta_step(
                view.to_matrix(m).astype(f32),
                view.to_matrix(g).astype(f32),
                view.to_matrix(p).astype(f32),
                decay,
                beta,
                form,
            )
            return view.from_matrix(new).astype(m.dtype)

        mu = matrix.map_leaves(one, dims_list, updates, pg, state.mu)
        out = jax.tree.map(lambda m, g: m.astype(g.dtype), mu, updates)
        return out, DeltaMomentumState(mu=mu, preconditioner=pstate)

    return optax.GradientTransformation(init_fn, update_fn)


def delta_momentum(
    learning_rate: optax.ScalarOrSchedule,
    decay=0.9,
    beta=0.5,
    preconditioner: Optional[optax.GradientTransformation] = None,
    mu_dtype=None,
    *,
    form: Literal["normalized", "literal"] = "normalized",
    dims: matrix.DimsSpec = None,
) -> optax.GradientTransformation:
    """Delta-momentum SGD (Eq. 48-49): ``M <- (decay I - beta G G^T/||G||^2) M + P(G)``, ``W -= lr M``.

    ``form='literal'``: ``M <- (decay I - beta G G^T) M + P(G)`` (Eq. 49 with ``beta = 1``).
    Reduces to ``optax.sgd(learning_rate, momentum=decay)`` when ``beta == 0`` (and ``P`` identity).
    """
    return optax.chain(
        scale_by_delta_momentum(decay, beta, preconditioner, mu_dtype, form=form, dims=dims),
        optax.scale_by_learning_rate(learning_rate),
    )
