"""Parameters with logical axis names, and a bias-free dense layer over several axes at once."""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def to_dtype(dtype) -> jnp.dtype:
    """Accepts a jnp dtype or its config name ('float32', 'bfloat16')."""
    return jnp.dtype(dtype)


def logical_param(
    rngs: nnx.Rngs | None, init, shape: Sequence[int], names: Sequence[str | None], dtype=jnp.float32
) -> nnx.Param:
    """An `nnx.Param` whose `out_sharding` metadata holds logical axis names, one per dimension.

    Eager sharding is off on purpose: placement is decided once for the whole state by
    `nl_jax.parallel.rules` (jit(init, out_shardings=...)), so models build with or without a mesh.
    `rngs=None` is for deterministic initialisers (ones / zeros).
    """
    shape, names = tuple(shape), tuple(names)
    if len(shape) != len(names):
        raise ValueError(f"param shape {shape} has {len(shape)} dims but {len(names)} axis names {names}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, shape, to_dtype(dtype)), out_sharding=names, eager_sharding=False)


def trailing_dot_general(x: jax.Array, w: jax.Array, n: int, preferred_element_type=None) -> jax.Array:
    """x [..., *in] . w [*in, *out] -> [..., *out] as one dot_general over the last n dims of x."""
    contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
    return jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=preferred_element_type)


def trailing_as_rows(x: jax.Array, w: jax.Array, n: int, preferred_element_type=None) -> jax.Array:
    """The same product as one 2-D matmul: x's leading dims flattened into rows."""
    lead, inner, out = x.shape[: x.ndim - n], w.shape[:n], w.shape[n:]
    rows, cols = math.prod(lead), math.prod(inner)
    y = jax.lax.dot_general(
        x.reshape(rows, cols),
        w.reshape(cols, math.prod(out)),
        (((1,), (0,)), ((), ())),
        preferred_element_type=preferred_element_type,
    )
    return y.reshape(*lead, *out)


def contract_trailing(x: jax.Array, w: jax.Array, n: int, *, preferred_element_type=None) -> jax.Array:
    """x [..., *in] . w [*in, *out] -> [..., *out], contracting the last n dims of x with the first n of w.

    On CPU as rows (`trailing_as_rows`): for a weight gradient that contracts batch and length,
    XLA:CPU first copies both operands into a transposed layout, which made a SwiGLU's forward and
    backward 3.4x slower (`python -m benchmarks.linear_layout`). Elsewhere one dot_general, so an
    accelerator never merges sharded leading dims.
    """
    kw = dict(n=n, preferred_element_type=preferred_element_type)
    return jax.lax.platform_dependent(
        x,
        w,
        cpu=functools.partial(trailing_as_rows, **kw),
        default=functools.partial(trailing_dot_general, **kw),
    )


class Linear(nnx.Module):
    """y = x . W contracting the last len(in_shape) dims of x; W has shape in_shape + out_shape.

    Multi-axis shapes keep heads as their own dimension, e.g. a query projection is
    (embed,) -> (heads, head_dim), so 'heads' can be sharded over 'tensor' without reshapes.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        in_names: Sequence[str],
        out_names: Sequence[str],
        *,
        init_std: float = 0.02,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.dtype = to_dtype(dtype)
        self.kernel = logical_param(
            rngs,
            jax.nn.initializers.normal(init_std),
            self.in_shape + self.out_shape,
            tuple(in_names) + tuple(out_names),
            param_dtype,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        n = len(self.in_shape)
        if x.shape[x.ndim - n :] != self.in_shape:
            raise ValueError(f"Linear expects trailing dims {self.in_shape}, got input shape {x.shape}")
        return contract_trailing(x.astype(self.dtype), self.kernel[...].astype(self.dtype), n)
