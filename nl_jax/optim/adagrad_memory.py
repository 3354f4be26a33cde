"""AdaGrad with momentum as an outer-product associative memory (Appendix B of the paper, Eq. 106-111).

Eq. 101's element-wise memory with the product replaced by a matrix product (Eq. 106):
``L~ = sum_i ||m g_i - P||^2 + lambda ||m||_F^2``. Its optimum (Eq. 107-110) is
``m* = (H + lambda I)^{-1} P M~`` with the value memory ``M~ = sum beta_1 g`` (momentum) and the
outer-product key memory ``H = sum beta_2 g g^T``; with ``P = H^{1/2}`` (Eq. 111, Adam's choice) the
update is ``W <- W - eta H^{-1/2} M~``: AdaGrad with momentum, full-matrix on one side.

Layout. The paper's gradient is ``d_out x d_in``, so ``g g^T`` is ``d_out x d_out``. In this package's
``(n_in, n_out)`` view (``y = x @ W``, the paper's transpose) that is ``H = sum G^T G`` on the output
side, and the update is ``u = M~ H^{-1/2}`` (one ``H`` per matrix, batch axes independent).

Here, as in :func:`~nl_jax.optim.scale_by_adam_memory`, the memories are written with retention:
``M~ <- b1 M~ + g`` and ``H <- b2 H + G^T G`` (``b2 = 1``, the default, is AdaGrad's accumulation;
``b1 = 0`` is AdaGrad itself, Eq. 111's "generalises AdaGrad"). ``H`` starts at
``initial_accumulator_value I`` and the read-out is ``(H + eps I)^{-1/2}`` (``eps`` inside the root as
in ``optax.adagrad``; ``H + eps I`` plays the part of Eq. 107's ``H + lambda I``), from an
eigendecomposition: ``n_out x n_out`` per matrix and step is the cost.

Vectors and scalars use the element-wise (diagonal) memory, which with ``b1 = 0`` is
``optax.adagrad`` exactly. ``H`` is stored with the parameter's rank (reduction axes resized to
``n_out``) so that ``optax.tree_map_params`` can give it the parameter's sharding spec.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nl_jax.optim import matrix


class AdagradMemoryState(NamedTuple):
    """State of :func:`scale_by_adagrad_memory`: value memory ``mu`` (M~) and key memory ``nu`` (H)."""

    mu: optax.Updates
    nu: optax.Updates


def _key_shape(shape, d: matrix.MatrixDims):
    red, out = matrix.normalize_axes(len(shape), d)
    n_out = 1
    for a in out:
        n_out *= shape[a]
    return matrix.with_axes_resized(shape, red, n_out)


def inverse_sqrt(h: jax.Array) -> jax.Array:
    """``h^{-1/2}`` for a batch of symmetric positive definite matrices (eigenvalues clipped at 0;
    the caller adds ``eps I`` first)."""
    evals, evecs = jnp.linalg.eigh(h)
    scale = 1.0 / jnp.sqrt(jnp.maximum(evals, 0.0))
    return (evecs * scale[..., None, :]) @ jnp.swapaxes(evecs, -1, -2)


def scale_by_adagrad_memory(
    b1=0.9,
    b2=1.0,
    initial_accumulator_value=0.1,
    eps=1e-7,
    mu_dtype=None,
    *,
    dims: matrix.DimsSpec = None,
) -> optax.GradientTransformation:
    """Outer-product associative memory whose optimum is AdaGrad with momentum (Eq. 106-111).

    Matrices: ``M~ <- b1 M~ + G``, ``H <- b2 H + G^T G`` (``H`` starts at
    ``initial_accumulator_value I``), ``u = M~ (H + eps I)^{-1/2}`` with the root taken on the
    eigenvalues. Vectors and scalars: the same element-wise, ``u = M~ / sqrt(H + eps)`` (as in
    ``optax.scale_by_rss``). See the module docstring for the layout.

    Reduces to ``optax.adagrad(lr, initial_accumulator_value, eps)`` (alias) on vectors with
    ``b1=0``, ``b2=1``; on matrices it is the full-matrix (one-sided) form, not the diagonal one
    (tests/optim/test_adagrad_memory.py).
    """

    def init_fn(params):
        dims_list = matrix.leaf_dims(dims, params)
        leaves, treedef = jax.tree.flatten(params)

        def key_memory(d, p):
            if d is None:
                return jnp.full(p.shape, initial_accumulator_value, p.dtype)
            shape = _key_shape(p.shape, d)
            view = matrix.matrix_view(shape, d)
            eye = jnp.broadcast_to(jnp.eye(view.fan_out, dtype=p.dtype), view.flat_shape)
            return view.from_matrix(initial_accumulator_value * eye)

        return AdagradMemoryState(
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=treedef.unflatten([key_memory(d, p) for d, p in zip(dims_list, leaves)]),
        )

    def update_fn(updates, state, params=None):
        del params
        dims_list = matrix.leaf_dims(dims, updates)

        def one(d, g, m, h):
            f32 = jnp.promote_types(g.dtype, jnp.float32)
            new_m = b1 * m.astype(f32) + g.astype(f32)
            if d is None:
                new_h = b2 * h + jnp.square(g)
                # optax.scale_by_rss's read-out: 0 where nothing was accumulated.
                u = jnp.where(new_h > 0, jax.lax.rsqrt(new_h + eps), 0.0) * new_m
                return new_m.astype(m.dtype), new_h.astype(h.dtype), u.astype(g.dtype)
            view = matrix.matrix_view(g.shape, d)
            h_view = matrix.matrix_view(h.shape, d)
            gm, mm = view.to_matrix(g).astype(f32), view.to_matrix(new_m)
            hm = b2 * h_view.to_matrix(h).astype(f32) + jnp.swapaxes(gm, -1, -2) @ gm
            u = mm @ inverse_sqrt(hm + eps * jnp.eye(hm.shape[-1], dtype=f32))
            # + 0 * M~: the eigh factor is replicated and would leave u's output axis replicated;
            # the term ties u to the momentum's (the parameter's) sharding. Exact: u + 0 == u.
            u = u + 0.0 * mm
            return (
                new_m.astype(m.dtype),
                h_view.from_matrix(hm).astype(h.dtype),
                view.from_matrix(u).astype(g.dtype),
            )

        mu, nu, out = matrix.map_leaves_multi(one, 3, dims_list, updates, state.mu, state.nu)
        return out, AdagradMemoryState(mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adagrad_memory(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=1.0,
    initial_accumulator_value=0.1,
    eps=1e-7,
    mu_dtype=None,
    *,
    dims: matrix.DimsSpec = None,
) -> optax.GradientTransformation:
    """AdaGrad with momentum as an outer-product memory (Eq. 106-111): ``W <- W - lr M~ H^{-1/2}``.

    Reduces to ``optax.adagrad(learning_rate, initial_accumulator_value, eps)`` on vectors and
    scalars with ``b1=0``.
    """
    return optax.chain(
        scale_by_adagrad_memory(b1, b2, initial_accumulator_value, eps, mu_dtype, dims=dims),
        optax.scale_by_learning_rate(learning_rate),
    )
