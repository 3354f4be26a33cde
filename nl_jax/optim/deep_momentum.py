"""Deep Momentum Gradient Descent, DMGD (Eq. 50 of the paper): the momentum is an MLP memory.

How a matrix gradient is fed to the memory (the paper leaves it open). The paper's linear momentum
is already a memory from the input space of the layer to its output space: with the weight viewed
as ``(n_in, n_out)`` (``y = x @ W``), ``<m g^T, I> = sum_r <m(e_r), g_r>``, i.e. the memory is asked,
at each input coordinate ``r`` (the key ``e_r``), for a row of ``n_out`` values aligned with the
gradient's row ``g_r``. DMGD replaces that linear map by a residual MLP over the same keys:

    U(theta) = M + phi(A) B / sqrt(n_in)          theta = (M, A, B)
    M: (n_in, n_out) linear path,  A: (n_in, h) = W_2 applied to the one-hot keys,
    B: (h, n_out) = W_1,  phi = tanh by default

(the rows of ``U`` are ``m(e_r) = M^T e_r + W_1 phi(W_2 e_r)/sqrt(n_in)``, the ``z + W1 s(W2 z)`` shape of
docs/design.md, Decision 4). So each gradient row is the target value for its row key; the whole gradient is
one batch of ``n_in`` (key, value) pairs and the memory has ``h (n_in + n_out)`` extra fast weights per matrix
(``h`` = ``MomentumMLP.hidden``, e.g. 16): the MLP state stays small for big matrices. The ``1/sqrt(n_in)``
makes ``phi(A) phi(A)^T / n_in`` O(1) for ``A ~ N(0, 1)``.

Inner objective (paper: dot product / value-less, Eq. 50): ``L(theta) = -<U(theta), G>``
(``objective='dot'``) or ``1/2 ||U(theta) - G||^2`` (``'l2'``, a delta-rule memory). One inner GD
step with retention ``decay`` per outer step: ``theta <- decay theta - lr_theta grad L``, with
``lr_theta = inner_lr`` for ``M`` and ``mlp_lr`` for ``(A, B)``; the update is the read-out
``U(theta_new)``. ``A`` starts random (``N(0, init_scale^2)``), ``B`` and ``M`` at zero, so the
memory's initial read-out is zero, as for momentum. Stacked / N-D parameters use
:mod:`nl_jax.optim.matrix` (one MLP per batch element); vectors and scalars use the linear path only
(plain momentum).

The gradient as the key (``key='gradient'``, Eq. 50 read literally: ``m(u_i)`` with ``u_i = g_i``).
``<m g^T, I>`` has a second, dual reading: the memory is a map ``m: R^{n_in} -> R^{n_out}`` (the shape
of the layer itself), its keys are the gradient's columns ``G[:, c]`` (the gradient of output unit
``c``'s incoming weights, i.e. the rows of the paper's ``d_out x d_in`` gradient) and their values the
one-hot ``e_c`` (the ``I`` / ``1`` of Eq. 33 and 50). The MLP now sees the gradient as its input::

    m_theta(Z) = Z M + phi(Z A) B / sqrt(n_in)        Z = G^T: (n_out, n_in), one key per row
    'dot': L(theta) = -<m_theta(G^T), I>             'l2': L(theta) = 1/2 ||m_theta(G^T) - I||^2

with the same parameters, initialisation, retention and step sizes as above. The weight update is the
memory read out on the basis of the input space, ``U = m_theta(I) = M + phi(A) B / sqrt(n_in)`` (the
memory as a matrix; for a linear memory, the memory itself, as in Eq. 33). Vectors and scalars use a
linear memory on their ``n x 1`` column (key ``g^T``, value 1). With a linear memory (``memory=None``
or ``mlp_lr=0``) both readings give momentum under ``'dot'`` (``M <- decay M + inner_lr G``), and the
gradient-key ``'l2'`` memory is literal delta momentum (Eq. 49: ``M <- (decay I - inner_lr G G^T) M
+ inner_lr G``, tests/optim/test_delta_deep.py).

Muon (Eq. 52: a linear memory with a Newton-Schulz output nonlinearity) is the linear memory of
either reading under ``'dot'``, followed by :func:`~nl_jax.optim.scale_by_newton_schulz`: the two
readings differ only once the memory is an MLP.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nl_jax.optim import matrix


class MomentumMLP(NamedTuple):
    """Shape of the deep momentum memory (static: not injected by ``inject_hyperparams``)."""

    hidden: int = 16
    activation: Callable[[jax.Array], jax.Array] = jnp.tanh
    init_scale: float = 1.0
    seed: int = 0


class DeepMomentumState(NamedTuple):
    """State of :func:`scale_by_deep_momentum`.

    ``mu``: linear path ``M`` (param-shaped). ``w_in`` / ``w_out``: the MLP's ``A`` / ``B``, stored with
    the parameter's rank (output axes -> ``hidden`` for ``A``, reduction axes -> ``hidden`` for
    ``B``) so that ``optax.tree_map_params`` can give them the parameter's sharding spec (``hidden``
    must then divide by the mesh axes that shard those axes: the default 16 does for meshes of up to
    16 along them); vectors keep an unused param-shaped zero and scalars a 0-d zero.
    """

    mu: optax.Updates
    w_in: optax.Updates
    w_out: optax.Updates


def _mlp_shapes(shape, d: matrix.MatrixDims, hidden: int):
    red, out = matrix.normalize_axes(len(shape), d)
    return (matrix.with_axes_resized(shape, out, hidden), matrix.with_axes_resized(shape, red, hidden))


def readout(m, a, b, activation):
    """``U = M + phi(A) B / sqrt(n_in)`` on ``(batch, n_in, n_out)`` matrices."""
    return m + activation(a) @ b / jnp.sqrt(jnp.asarray(a.shape[-2], a.dtype))


def _gradient_key_step(g, m, a, b, decay, inner_lr, mlp_lr, activation, objective):
    """One step of the gradient-keyed memory on ``(batch, n_in, n_out)`` matrices (``a=None``: linear).

    Returns the new ``(M, A, B)``; ``A, B`` are ``None`` for a linear memory.
    """
    z = jnp.swapaxes(g, -1, -2)  # keys: one gradient column per output unit
    eye = jnp.eye(g.shape[-1], dtype=g.dtype)
    scale = jnp.sqrt(jnp.asarray(g.shape[-2], g.dtype))

    def memory_fn(m_, a_, b_):
        out = z @ m_
        return out if a_ is None else out + activation(z @ a_) @ b_ / scale

    out, vjp = jax.vjp(memory_fn, m, a, b)
    s = eye if objective == "dot" else eye - out  # = -dL/d(memory output)
    gm, ga, gb = vjp(jnp.broadcast_to(s, out.shape))
    new_m = decay * m + inner_lr * gm
    if a is None:
        return new_m, None, None
    return new_m, decay * a + mlp_lr * ga, decay * b + mlp_lr * gb


def _from_matrices(views, values, likes) -> tuple:
    """Each matrix of `values` back in its leaf's layout (`views`) and dtype (`likes`)."""
    return tuple(v.from_matrix(x).astype(like.dtype) for v, x, like in zip(views, values, likes))


def scale_by_deep_momentum(
    decay=0.9,
    inner_lr=1.0,
    mlp_lr=1.0,
    memory: Optional[MomentumMLP] = MomentumMLP(),
    mu_dtype=None,
    *,
    objective: Literal["dot", "l2"] = "dot",
    key: Literal["coordinate", "gradient"] = "coordinate",
    dims: matrix.DimsSpec = None,
) -> optax.GradientTransformation:
    """DMGD (Eq. 50): momentum = residual MLP memory trained online on the gradients.

    See the module docstring for the memory and how a matrix gradient is fed: ``key='coordinate'``
    (default) keys the memory by one-hot input coordinates with the gradient's rows as values;
    ``key='gradient'`` is Eq. 50 read literally, the gradient's columns as keys and one-hot values.
    ``memory=None`` is the linear memory ``U = M``.

    Reduces to ``optax.trace(decay)`` (so the alias to ``optax.sgd(lr, momentum=decay)``) exactly with
    ``memory=None, objective='dot', inner_lr=1``; with an MLP memory and ``mlp_lr=0`` it is the same
    (``B`` stays 0).
    """
    if objective not in ("dot", "l2"):
        raise ValueError(f"objective must be 'dot' or 'l2', got {objective!r}")
    if key not in ("coordinate", "gradient"):
        raise ValueError(f"key must be 'coordinate' or 'gradient', got {key!r}")

    def init_fn(params):
        mu = optax.tree.zeros_like(params, dtype=mu_dtype)
        leaves, treedef = jax.tree.flatten(params)
        dims_list = matrix.leaf_dims(dims, params) if memory is not None else [None] * len(leaves)
        shapes = [
            None if d is None else _mlp_shapes(p.shape, d, memory.hidden) for d, p in zip(dims_list, leaves)
        ]
        sizes = [0 if s is None else math.prod(s[0]) for s in shapes]
        if sum(sizes):  # one normal draw for every A (one RNG kernel, whatever the number of leaves)
            flat = memory.init_scale * jax.random.normal(
                jax.random.key(memory.seed), (sum(sizes),), jnp.float32
            )
        offsets = np.cumsum([0] + sizes)
        w_in, w_out = [], []
        for i, (s, p) in enumerate(zip(shapes, leaves)):
            dtype = mu_dtype or p.dtype
            if s is None:
                dummy = jnp.zeros(p.shape if p.ndim else (), dtype)
                w_in.append(dummy)
                w_out.append(dummy)
                continue
            w_in.append(flat[offsets[i] : offsets[i + 1]].reshape(s[0]).astype(dtype))
            w_out.append(jnp.zeros(s[1], dtype))
        return DeepMomentumState(mu=mu, w_in=treedef.unflatten(w_in), w_out=treedef.unflatten(w_out))

    def gradient_key(d, g, m, a, b):
        view = matrix.matrix_view(g.shape, d)  # d=None: the leaf as one n x 1 column
        f32 = jnp.promote_types(m.dtype, jnp.float32)
        gm, mm = view.to_matrix(g).astype(f32), view.to_matrix(m).astype(f32)
        if memory is None or d is None:
            new_m, _, _ = _gradient_key_step(gm, mm, None, None, decay, inner_lr, mlp_lr, None, objective)
            new_m = view.from_matrix(new_m).astype(m.dtype)
            return new_m, a, b, new_m.astype(g.dtype)
        a_view = matrix.matrix_view(a.shape, d)
        b_view = matrix.matrix_view(b.shape, d)
        am, bm = a_view.to_matrix(a).astype(f32), b_view.to_matrix(b).astype(f32)
        new_m, new_a, new_b = _gradient_key_step(
            gm, mm, am, bm, decay, inner_lr, mlp_lr, memory.activation, objective
        )
        u = readout(new_m, new_a, new_b, memory.activation)
        return _from_matrices((view, a_view, b_view, view), (new_m, new_a, new_b, u), (m, a, b, g))

    def update_fn(updates, state, params=None):
        del params
        if key == "gradient":
            dims_list = matrix.leaf_dims(dims, updates)
            trees = (updates, state.mu, state.w_in, state.w_out)
            return _unpack(matrix.map_leaves_multi(gradient_key, 4, dims_list, *trees))
        dims_list = (
            matrix.leaf_dims(dims, updates) if memory is not None else [None] * len(jax.tree.leaves(updates))
        )

        def one(d, g, m, a, b):
            if d is None:  # linear path only: M <- decay M + inner_lr s
                s = g if objective == "dot" else g - m
                new_m = (decay * m + inner_lr * s).astype(m.dtype)
                return new_m, a, b, new_m.astype(g.dtype)
            view = matrix.matrix_view(g.shape, d)
            a_view = matrix.matrix_view(a.shape, d)
            b_view = matrix.matrix_view(b.shape, d)
            f32 = jnp.promote_types(m.dtype, jnp.float32)
            gm, mm = view.to_matrix(g).astype(f32), view.to_matrix(m).astype(f32)
            am, bm = a_view.to_matrix(a).astype(f32), b_view.to_matrix(b).astype(f32)
            read = lambda a_, b_: readout(mm, a_, b_, memory.activation)
            u_old, vjp = jax.vjp(read, am, bm)
            s = gm if objective == "dot" else gm - u_old  # = -dL/dU
            ga, gb = vjp(s)
            new_m = decay * mm + inner_lr * s
            new_a = decay * am + mlp_lr * ga
            new_b = decay * bm + mlp_lr * gb
            u = readout(new_m, new_a, new_b, memory.activation)
            return _from_matrices((view, a_view, b_view, view), (new_m, new_a, new_b, u), (m, a, b, g))

        return _unpack(matrix.map_leaves_multi(one, 4, dims_list, updates, state.mu, state.w_in, state.w_out))

    def _unpack(trees):
        mu, w_in, w_out, out = trees
        return out, DeepMomentumState(mu=mu, w_in=w_in, w_out=w_out)

    return optax.GradientTransformation(init_fn, update_fn)


def deep_momentum(
    learning_rate: optax.ScalarOrSchedule,
    decay=0.9,
    inner_lr=1.0,
    mlp_lr=1.0,
    memory: Optional[MomentumMLP] = MomentumMLP(),
    mu_dtype=None,
    *,
    objective: Literal["dot", "l2"] = "dot",
    key: Literal["coordinate", "gradient"] = "coordinate",
    dims: matrix.DimsSpec = None,
) -> optax.GradientTransformation:
    """DMGD SGD (Eq. 50): ``theta <- decay theta - lr_theta grad L(theta; G)``, ``W -= lr U(theta)``.

    Reduces to ``optax.sgd(learning_rate, momentum=decay)`` exactly with ``memory=None`` (linear
    memory), ``objective='dot'``, ``inner_lr=1``, in either ``key`` reading.
    """
    return optax.chain(
        scale_by_deep_momentum(
            decay, inner_lr, mlp_lr, memory, mu_dtype, objective=objective, key=key, dims=dims
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
