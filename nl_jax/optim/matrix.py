"""Which axes of a parameter form the matrix that a matrix optimizer acts on.

Matrix optimizers (Newton-Schulz / Muon, M3, delta momentum, deep momentum) see every parameter as
a batch of matrices ``(batch, n_in, n_out)``: ``n_in`` is the product of the *reduction* axes (the
axes a layer contracts with its input, ``y = x @ W``) and ``n_out`` the product of the *output* axes;
all other axes are batch axes, handled independently (scanned / stacked layers, heads, experts).

The default rule (``dims=None``) is: a parameter with ``ndim >= 2`` is a matrix whose last two axes
are (reduction, output) and whose leading axes are batch axes; so a scanned stack of layers
``(layers, d_in, d_out)`` is ``layers`` independent matrices. Parameters with ``ndim < 2`` (biases,
norm scales, scalars) get each optimizer's documented element-wise / vector fallback.

``dims`` may also be a single :class:`MatrixDims` (used for every parameter with ``ndim >= 2``), a
pytree with the structure of the params holding a :class:`MatrixDims` or ``None`` (fallback) per
leaf, or a callable ``params -> such a pytree`` (it is called on the updates, as in optax's Muon).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp


class MatrixDims(NamedTuple):
    """Reduction and output axes of a parameter; every other axis is a batch axis.

    Same meaning as ``optax.contrib.MuonDimensionNumbers``; negative axes count from the end. The
    default ``MatrixDims()`` is (reduction=-2, output=-1): last two axes, leading axes are batch.
    A conv kernel ``(kh, kw, c_in, c_out)`` is ``MatrixDims((0, 1, 2), 3)``.
    """

    reduction_axis: Union[int, Sequence[int]] = -2
    output_axis: Union[int, Sequence[int]] = -1


DimsSpec = Union[None, MatrixDims, Any, Callable[[Any], Any]]


def _is_dims(x) -> bool:
    return isinstance(x, MatrixDims)


def _default_dims(x, default: MatrixDims | None) -> MatrixDims | None:
    if getattr(x, "ndim", 0) < 2:
        return None
    return default if default is not None else MatrixDims()


def leaf_dims(dims: DimsSpec, tree) -> list[MatrixDims | None]:
    """One ``MatrixDims`` (or ``None`` = vector fallback) per leaf of ``tree``, in leaf order."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return []
    if callable(dims) and not _is_dims(dims):
        dims = dims(tree)
    if dims is None or _is_dims(dims):
        return [_default_dims(x, dims) for x in leaves]
    per_leaf = treedef.flatten_up_to(dims)
    out = []
    for x, d in zip(leaves, per_leaf):
        if d is not None and not _is_dims(d):
            raise TypeError(f"dims leaves must be MatrixDims or None, got {d!r}")
        if d is not None and x.ndim < 2:
            raise ValueError(f"MatrixDims {d} given for a parameter of shape {x.shape} (rank < 2)")
        out.append(d)
    return out


def _map(fn, dims_list, tree, rest):
    leaves, treedef = jax.tree.flatten(tree)
    rest_leaves = [treedef.flatten_up_to(r) for r in rest]
    return [fn(d, x, *rs) for d, x, *rs in zip(dims_list, leaves, *rest_leaves)], treedef


def map_leaves(fn, dims_list, tree, *rest):
    """``fn(dims, leaf, *rest_leaves)`` over the leaves of ``tree``; returns a tree like ``tree``."""
    outs, treedef = _map(fn, dims_list, tree, rest)
    return treedef.unflatten(outs)


def map_leaves_multi(fn, n_out, dims_list, tree, *rest):
    """Like :func:`map_leaves` for an ``fn`` returning a tuple of ``n_out`` leaves."""
    outs, treedef = _map(fn, dims_list, tree, rest)
    return tuple(treedef.unflatten([o[i] for o in outs]) for i in range(n_out))


def normalize_axes(ndim: int, dims: MatrixDims) -> tuple[tuple[int, ...], tuple[int, ...]]:
    red = (dims.reduction_axis,) if isinstance(dims.reduction_axis, int) else dims.reduction_axis
    out = (dims.output_axis,) if isinstance(dims.output_axis, int) else dims.output_axis
    red = tuple(a % ndim for a in red)
    out = tuple(a % ndim for a in out)
    if set(red) & set(out) or not red or not out:
        raise ValueError(f"reduction axes {red} and output axes {out} must be non-empty and disjoint")
    return red, out


class MatrixView(NamedTuple):
    """How to reshape an array with a given shape to ``(batch, n_in, n_out)`` and back."""

    perm: tuple[int, ...]
    inv_perm: tuple[int, ...]
    flat_shape: tuple[int, int, int]
    unflat_shape: tuple[int, ...]

    def to_matrix(self, x: jax.Array) -> jax.Array:
        return jnp.transpose(x, self.perm).reshape(self.flat_shape)

    def from_matrix(self, x: jax.Array) -> jax.Array:
        return jnp.transpose(x.reshape(self.unflat_shape), self.inv_perm)

    @property
    def fan_in(self) -> int:
        return self.flat_shape[1]

    @property
    def fan_out(self) -> int:
        return self.flat_shape[2]


def matrix_view(shape: Sequence[int], dims: MatrixDims | None) -> MatrixView:
    """The view of an array of ``shape``; ``dims=None`` views it as one ``(1, size, 1)`` column.

    A vector (or scalar) seen as a single ``n x 1`` column is how the vector fallbacks of delta
    momentum state themselves.
    """
    shape = tuple(shape)
    if dims is None:
        size = math.prod(shape)
        perm = tuple(range(len(shape)))
        return MatrixView(perm, perm, (1, size, 1), shape)
    red, out = normalize_axes(len(shape), dims)
    batch = tuple(a for a in range(len(shape)) if a not in red and a not in out)
    perm = batch + red + out
    inv = tuple(sorted(range(len(shape)), key=lambda i: perm[i]))
    size = lambda axes: math.prod(shape[a] for a in axes)
    flat = (size(batch), size(red), size(out))
    unflat = tuple(shape[a] for a in perm)
    return MatrixView(perm, inv, flat, unflat)


def with_axes_resized(shape: Sequence[int], axes: Sequence[int], first: int) -> tuple[int, ...]:
    """``shape`` with ``axes[0]`` set to ``first`` and the other ``axes`` set to 1 (same rank)."""
    shape = list(shape)
    for i, a in enumerate(sorted(axes)):
        shape[a] = first if i == 0 else 1
    return tuple(shape)
