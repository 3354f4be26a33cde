"""Newton-Schulz output nonlinearity (Eq. 52 of the paper) and Muon, its linear-momentum special case.

Eq. 52: ``W_{i+1} = W_i + sigma(m_{i+1}(u_i))``; with ``sigma`` = Newton-Schulz orthogonalisation
and ``m`` the linear momentum memory of Eq. 33, this is Muon (Eq. 42): ``W += NS_k(m)``,
``m = alpha m - eta g``.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from nl_jax.optim import matrix
from nl_jax.optim.momentum import scale_by_momentum_memory

QUINTIC = (3.4445, -4.7750, 2.0315)  # Muon's coefficients (Jordan et al.)
CUBIC = (1.5, -0.5, 0.0)  # X <- X (3I - X^T X) / 2: the textbook cubic iteration
ANCHORED_ZETA = 0.25  # step of the "anchored" preset (Eq. 44); stable for zeta < 0.4 (see below)
_PRESETS = {"quintic": QUINTIC, "cubic": CUBIC}
_NAMES = sorted(_PRESETS) + ["anchored"]

Coeffs = Union[str, Sequence[float]]


def _coeffs(ns_coeffs: Coeffs) -> tuple[float, float, float]:
    if isinstance(ns_coeffs, str):
        if ns_coeffs not in _PRESETS:
            raise ValueError(f"unknown ns_coeffs preset {ns_coeffs!r}; choose from {_NAMES}")
        return _PRESETS[ns_coeffs]
    c = tuple(ns_coeffs)
    if len(c) != 3:
        raise ValueError(f"ns_coeffs must be 3 numbers (a, b, c), got {ns_coeffs!r}")
    return c


def newton_schulz(x: jax.Array, ns_steps=5, ns_coeffs: Coeffs = "quintic", eps=1e-7) -> jax.Array:
    """Orthogonalise a batch of matrices ``x: (..., m, n)`` by Newton-Schulz iterations.

    ``X <- X / (||X||_F + eps)``, then ``ns_steps`` times ``X <- a X + (b A + c A A) X`` with
    ``A = X X^T`` (the wide orientation is used: ``x`` is transposed when ``m > n``). Computed in
    float32 and cast back. ``ns_steps`` may be a traced integer (``optax.inject_hyperparams``).

    ``ns_coeffs='anchored'`` is the iteration the paper derives (Eq. 43-44): one gradient step of size
    ``zeta`` on ``||O^T O - I||_F^2`` plus closeness to the (normalised) input ``g``,
    ``O <- O - zeta (O - g + 2 O (O^T O - I))`` from ``O_0 = g`` (:func:`anchored_newton_schulz`,
    ``zeta = ANCHORED_ZETA``). The anchor ``g`` stays in every step, so it is not the textbook cubic
    (``'cubic'``): a singular value ``s`` of ``g`` goes to the root ``o`` of ``2 o^3 - o = s``
    (``o = 1`` for ``s = 1``, ``1/sqrt(2)`` as ``s -> 0``), not to 1.
    """
    if isinstance(ns_coeffs, str) and ns_coeffs == "anchored":
        return anchored_newton_schulz(x, ns_steps, ANCHORED_ZETA, eps)
    a, b, c = _coeffs(ns_coeffs)

    def step(_, x):
        gram = x @ jnp.swapaxes(x, -1, -2)
        poly = b * gram + c * gram @ gram
        return a * x + poly @ x

    return _iterate_normalized(x, ns_steps, eps, lambda g: step)


def _iterate_normalized(x: jax.Array, ns_steps, eps, make_step) -> jax.Array:
    """Runs `make_step(g)` `ns_steps` times from g = x / (||x||_F + eps), in float32 (at least) and
    in the wide orientation (rows <= columns, so the Gram matrices are the small ones); `ns_steps`
    may be traced (a fori_loop) or a Python int (unrolled)."""
    dtype = x.dtype
    x = x.astype(jnp.promote_types(dtype, jnp.float32))
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = jnp.swapaxes(x, -1, -2)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
    g = x / (norm + eps)
    step = make_step(g)
    if isinstance(ns_steps, int):
        o = g
        for i in range(ns_steps):
            o = step(i, o)
    else:
        o = jax.lax.fori_loop(0, ns_steps, step, g)
    if transposed:
        o = jnp.swapaxes(o, -1, -2)
    return o.astype(dtype)


def anchored_newton_schulz(x: jax.Array, ns_steps=5, zeta=ANCHORED_ZETA, eps=1e-7) -> jax.Array:
    """Eq. 44 on a batch of matrices: ``O <- O - zeta (O - g + 2 O (O^T O - I))``, ``O_0 = g``.

    ``g = x / (||x||_F + eps)`` (per matrix, as in :func:`newton_schulz`), computed in the wide
    orientation (``O (O^T O) = (O O^T) O``). Its fixed points have singular values ``o`` with
    ``2 o^3 - o = s``; the step is a contraction there for ``zeta < 0.4`` (at ``o = 1`` the
    derivative is ``1 - 5 zeta``). ``ns_steps`` may be traced.
    """

    def make_step(g):
        def step(_, o):
            cube = (o @ jnp.swapaxes(o, -1, -2)) @ o
            return o - zeta * (o - g + 2.0 * (cube - o))

        return step

    return _iterate_normalized(x, ns_steps, eps, make_step)


def orthogonalize(
    x: jax.Array, dims: matrix.MatrixDims, ns_steps=5, ns_coeffs: Coeffs = "quintic", eps=1e-7
) -> jax.Array:
    """Newton-Schulz on an N-D array whose matrix axes are given by ``dims`` (batch axes vmapped)."""
    view = matrix.matrix_view(x.shape, dims)
    return view.from_matrix(newton_schulz(view.to_matrix(x), ns_steps, ns_coeffs, eps))


def shape_scale_factor(fan_in: int, fan_out: int, shape_scale: str, consistent_rms=0.2):
    """Post-NS scale: 'none' 1; 'width' sqrt(max(1, n_out/n_in)); 'rms' rms*sqrt(max(n_in, n_out))."""
    if shape_scale == "none":
        return 1.0
    if shape_scale == "width":
        return max(1.0, fan_out / fan_in) ** 0.5
    if shape_scale == "rms":
        return consistent_rms * max(fan_in, fan_out) ** 0.5
    raise ValueError(f"shape_scale must be 'none', 'width' or 'rms', got {shape_scale!r}")


def _vector_polar(x: jax.Array, eps) -> jax.Array:
    """Exact polar factor of a vector seen as one ``1 x n`` row: ``x / ||x||`` (sign for scalars)."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (xf / (jnp.sqrt(jnp.sum(jnp.square(xf))) + eps)).astype(x.dtype)


def scale_by_newton_schulz(
    ns_steps=5,
    ns_coeffs: Coeffs = "quintic",
    eps=1e-7,
    *,
    shape_scale: Literal["none", "width", "rms"] = "none",
    consistent_rms=0.2,
    vector_rule: Literal["normalize", "identity"] = "normalize",
    dims: matrix.DimsSpec = None,
) -> optax.GradientTransformation:
    """Nonlinear output sigma = Newton-Schulz (Eq. 52), a stateless transform.

    Every matrix leaf (see :mod:`nl_jax.optim.matrix`) becomes ``s * NS_k(u)`` with
    ``s = shape_scale_factor(n_in, n_out, shape_scale)`` (``'width'``: Muon's
    ``sqrt(max(1, n_out/n_in))``; ``'rms'``: ``consistent_rms * sqrt(max(n_in, n_out))``, an
    AdamW-like update RMS). Leaves without matrix dims follow ``vector_rule``:
    ``'normalize'`` treats the vector as a single ``1 x n`` row and uses its exact polar factor
    ``u / ||u||`` (times the same shape scale, e.g. ``sqrt(n)`` for 'width', i.e. a unit-RMS step);
    ``'identity'`` passes it through.
    Chain it after any momentum memory: after :func:`scale_by_momentum_memory` it is Muon.
    """

    def update_fn(updates, state, params=None):
        del params
        dims_list = matrix.leaf_dims(dims, updates)

        def one(d, u):
            if d is None:
                if vector_rule == "identity":
                    return u
                scale = shape_scale_factor(1, u.size, shape_scale, consistent_rms)  # a 1 x n row
                return (_vector_polar(u, eps) * scale).astype(u.dtype)
            view = matrix.matrix_view(u.shape, d)
            o = view.from_matrix(newton_schulz(view.to_matrix(u), ns_steps, ns_coeffs, eps))
            scale = shape_scale_factor(view.fan_in, view.fan_out, shape_scale, consistent_rms)
            return (o * scale).astype(u.dtype)

        return matrix.map_leaves(one, dims_list, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    beta=0.95,
    ns_steps=5,
    ns_coeffs: Coeffs = "quintic",
    eps=1e-7,
    weight_decay: Optional[float] = None,
    mu_dtype=None,
    *,
    nesterov: bool = False,
    shape_scale: Literal["none", "width", "rms"] = "width",
    consistent_rms=0.2,
    dims: matrix.DimsSpec = None,
) -> optax.GradientTransformation:
    """Muon = linear momentum memory (Eq. 33) + Newton-Schulz output (Eq. 52).

    ``m <- beta m + g``; ``u = s NS_k(m)`` (``u = s m/||m||`` for vectors, see
    :func:`scale_by_newton_schulz`); ``W <- W - lr (u + wd W)``.

    Reduces to a plain reference of momentum + Newton-Schulz (``m = beta m + g``,
    ``W -= lr * NS_k(m)``, python loop, tests/optim/test_reductions.py) with
    ``shape_scale='none'``; with the default ``shape_scale='width'`` and ``nesterov=False`` it matches
    ``optax.contrib.muon(nesterov=False)`` on 2-D weights up to its ``eps``.
    ``weight_decay=None`` (default) leaves the decay out, so ``params`` are not needed in ``update``.
    """
    parts = [
        scale_by_momentum_memory(decay=beta, nesterov=nesterov, mu_dtype=mu_dtype),
        scale_by_newton_schulz(
            ns_steps, ns_coeffs, eps, shape_scale=shape_scale, consistent_rms=consistent_rms, dims=dims
        ),
    ]
    if weight_decay is not None:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
