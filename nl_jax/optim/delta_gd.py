"""Delta Gradient Descent (DGD, Eq. 56-57 of the paper) as an optimizer of ordinary weights.

GD is the proximal step on a dot-product objective (Eq. 55); DGD replaces it by an L2 regression of
the layer's output on the self-generated value ``u_t = -grad_y L`` (Eq. 56)::

    W_{t+1} = argmin_W 1/2 ||W x_t - u_t||^2 + 1/(2 eta) ||W - W_t||^2
            = W_t (I - eta' x_t x_t^T) - eta' grad_y L x_t^T,    eta' = eta / (1 + eta ||x_t||^2)   (57)

(Sherman-Morrison; the paper states ``eta' = eta / (1 + eta)`` for unit-norm ``x_t``). In this
package's layout (``y = x @ W``, ``W: (n_in, n_out)``, the paper's transpose) and for a batch of
tokens, with ``G = sum_t x_t grad_{y_t} L^T`` the weight gradient and ``S = sum_t x_t x_t^T`` the
second moment of the layer's inputs, the sum of the tokens' regression terms plus the proximal term is
minimised by::

    W_{t+1} = (I + eta S)^{-1} (W_t - eta G) = W_t - eta u,      u = (I + eta S)^{-1} (G + S W_t)

which is Eq. 57 exactly for one token, whatever its norm. ``u`` is what :func:`scale_by_delta_gd`
returns (``W <- W - lr u`` in the alias, ``eta = lr``).

Where ``S`` comes from. An optax transform sees gradients, not layer inputs, so ``S`` is an optional
extra argument of ``update``: ``tx.update(grads, state, params, input_cov=covs)``, ``covs`` a pytree
like the params whose leaves are ``S`` in the matrix view (``(n_in, n_in)`` or
``(batch, n_in, n_in)``, see :mod:`nl_jax.optim.matrix`) or ``None``. That is the form closest to the
paper, and the one to use when the inputs are at hand (the same token weighting as the loss: ``X^T X /
T`` for a mean over ``T`` tokens). Without it (``input_cov=None`` or a ``None`` leaf) the decay
direction is taken from the gradient itself: ``S = G G^T / ||G||_F^2``. For one token ``G = x
grad_y L^T`` this is ``x x^T / ||x||^2``, so the proxy is Eq. 57 exactly in the paper's own setting
(one token, unit-norm input, ``eta' = eta/(1+eta)``); for a batch it is a reinterpretation (input
directions weighted by their output errors, trace 1). Both forms are tested against the argmin.

``decay`` scales ``S`` (the data-dependent decay coefficient ``alpha_t`` of Eq. 121): ``decay=0`` is
SGD. Vectors and scalars (biases, norm scales) take a plain gradient step (``S = 0``): a bias's input
is the constant 1, and decaying it would be weight decay on biases. The solve costs ``n_in^3`` per
matrix and step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nl_jax.optim import matrix


class DeltaGDState(NamedTuple):
    """State of :func:`scale_by_delta_gd`: the step count (for a learning-rate schedule)."""

    count: jax.Array


def learning_rate_at(learning_rate: optax.ScalarOrSchedule, count):
    """The learning rate of this step: a float/array as is, a schedule evaluated at ``count``."""
    return learning_rate(count) if callable(learning_rate) else learning_rate


def dgd_direction(g: jax.Array, w: jax.Array, s: jax.Array | None, eta, decay) -> jax.Array:
    """``u = (I + eta c S)^{-1} (G + c S W)`` on ``(b, n_in, n_out)`` matrices (``c = decay``).

    ``s=None`` uses the gradient proxy ``S = G G^T / ||G||_F^2`` (per batch element).
    """
    if s is None:
        sq = jnp.sum(jnp.square(g), axis=(-2, -1), keepdims=True)
        s = g @ jnp.swapaxes(g, -1, -2) / jnp.maximum(sq, jnp.finfo(g.dtype).tiny)
    s = jnp.broadcast_to(decay * s, g.shape[:-2] + (g.shape[-2], g.shape[-2]))
    lhs = jnp.eye(g.shape[-2], dtype=g.dtype) + eta * s
    # + 0 * G: the solve's output is replicated by XLA; the term ties u to the gradient's sharding.
    return jnp.linalg.solve(lhs, g + s @ w) + 0.0 * g


def scale_by_delta_gd(
    learning_rate: optax.ScalarOrSchedule, decay=1.0, *, dims: matrix.DimsSpec = None
) -> optax.GradientTransformationExtraArgs:
    """DGD direction (Eq. 56-57): ``u = (I + eta S)^{-1} (G + S W)``, ``eta`` = ``learning_rate``.

    See the module docstring for ``S`` (extra argument ``input_cov``, else the gradient proxy).
    ``learning_rate`` must be the one the update is later scaled by (the alias :func:`delta_gd` passes
    the same value to both): the exact proximal step depends on it. ``update`` needs ``params``.

    Reduces to SGD (``u = G``) with ``decay=0`` (tests/optim/test_delta_gd.py).
    """

    def init_fn(params):
        del params
        return DeltaGDState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, input_cov=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("scale_by_delta_gd needs the params (its decay term is S W)")
        eta = learning_rate_at(learning_rate, state.count)
        dims_list = matrix.leaf_dims(dims, updates)
        leaves, treedef = jax.tree.flatten(updates)
        covs = [None] * len(leaves) if input_cov is None else treedef.flatten_up_to(input_cov)

        def one(d, g, w, s):
            if d is None:
                return g
            view = matrix.matrix_view(g.shape, d)
            f32 = jnp.promote_types(g.dtype, jnp.float32)
            s = None if s is None else jnp.asarray(s, f32).reshape((-1,) + (view.fan_in,) * 2)
            u = dgd_direction(view.to_matrix(g).astype(f32), view.to_matrix(w).astype(f32), s, eta, decay)
            return view.from_matrix(u).astype(g.dtype)

        out = [
            one(d, g, w, s) for d, g, w, s in zip(dims_list, leaves, treedef.flatten_up_to(params), covs)
        ]
        return treedef.unflatten(out), DeltaGDState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def delta_gd(
    learning_rate: optax.ScalarOrSchedule, decay=1.0, *, dims: matrix.DimsSpec = None
) -> optax.GradientTransformationExtraArgs:
    """Delta Gradient Descent (Eq. 56-57): ``W <- (I + lr S)^{-1} (W - lr G)``.

    ``tx.update(grads, state, params, input_cov=S_tree)`` with the layers' input second moments, or
    without it (gradient proxy, exact for one unit-norm token). Reduces to ``optax.sgd(lr)`` with
    ``decay=0``.
    """
    return optax.chain(
        scale_by_delta_gd(learning_rate, decay, dims=dims), optax.scale_by_learning_rate(learning_rate)
    )
