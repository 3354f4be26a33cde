"""Memory structures, inner objectives and the carried state of an associative memory.

A memory maps keys to values with fast weights that are updated in context. Two structures, both
per head (weights carry leading batch and head axes, `[B, H, out, in]`):

  linear  M(z) = W z                       W: [Dv, Dk]
  mlp     M(z) = z + W1 s(W2 z)            W2: [Dh, D] (input side), W1: [D, Dh]  (SPEC D4)

Two inner objectives, per token:

  l2   L = 1/2 ||M(k) - v||^2              (delta rule / Titans / TTT)
  dot  L = -<M(k), v>                      (Hebbian: linear attention, RetNet)

With `self_target` the memory generates its own target from the given value, v_hat = M_B(v) with
the state of the last chunk boundary (self-modifying Titans, paper 4.3); the inner gradient treats
v_hat as a constant (it is the regression target), the outer gradient flows through it.

For one token the gradient of either objective with respect to every weight matrix is rank one,
`dL/dW = e x^T`, with `x` the input of that matrix and `e` the error backpropagated to its output.
The chunked and recurrent forms work with these factors (`token_errors`) instead of full gradients;
the naive form uses `jax.grad` on `token_loss`, which is how the factors are tested.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

STRUCTURES = ("linear", "mlp")
OBJECTIVES = ("l2", "dot")
ACTIVATIONS = {"gelu": jax.nn.gelu, "silu": jax.nn.silu, "tanh": jnp.tanh, "relu": jax.nn.relu}


class LinearWeights(NamedTuple):
    w: jax.Array  # [..., Dv, Dk]


class MLPWeights(NamedTuple):
    w1: jax.Array  # [..., D, Dh]   output side
    w2: jax.Array  # [..., Dh, D]   input side: the weight that acts on the key (DGD applies here)


Weights = LinearWeights | MLPWeights


@dataclasses.dataclass(frozen=True)
class MemorySpec:
    """Static description of a memory: structure, inner objective, MLP activation, target source."""

    structure: str = "linear"
    objective: str = "l2"
    activation: str = "gelu"
    self_target: bool = False

    def __post_init__(self):
        if self.structure not in STRUCTURES:
            raise ValueError(f"memory structure must be one of {STRUCTURES}, got {self.structure!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"memory objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"memory activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}"
            )

    @property
    def act(self):
        return ACTIVATIONS[self.activation]


class MemoryState(NamedTuple):
    """What a memory carries from one call (or one token) to the next.

    weights:  the fast weights W_t after the last token seen.
    momentum: the surprise S_t, same structure as `weights`; None when the rule has no momentum.
    boundary: the fast weights at the last chunk boundary. Gradients of a chunk, and reads in
              `boundary` mode, use this state (SPEC D6). Equal to `weights` at a boundary.
    step:     int32 scalar, tokens consumed since the last chunk boundary (0 at a boundary).
    """

    weights: Any
    momentum: Any
    boundary: Any
    step: jax.Array


def init_state(weights: Weights, momentum: bool) -> MemoryState:
    """A state at a chunk boundary: zero momentum (or None) and boundary = weights."""
    mom = jax.tree.map(jnp.zeros_like, weights) if momentum else None
    return MemoryState(weights, mom, weights, jnp.zeros((), jnp.int32))


def check_weights(spec: MemorySpec, weights: Weights) -> None:
    expected = LinearWeights if spec.structure == "linear" else MLPWeights
    if not isinstance(weights, expected):
        raise TypeError(f"{spec.structure} memory needs {expected.__name__}, got {type(weights).__name__}")
    if spec.structure == "mlp":
        d_out, d_hid = weights.w1.shape[-2:]
        if weights.w2.shape[-2:] != (d_hid, d_out):
            raise ValueError(
                f"mlp memory needs w1 [.., D, Dh] and w2 [.., Dh, D]; got {weights.w1.shape} and {weights.w2.shape}"
            )


def matmul_t(x, w):
    """x [..., C, I] times w[..., O, I]^T -> [..., C, O], batched over the leading axes of w."""
    return jnp.einsum("...ci,...oi->...co", x, w)


def apply(spec: MemorySpec, weights: Weights, x: jax.Array) -> jax.Array:
    """M(x) for a block of tokens: weights [..., O, I], x [..., C, I] -> [..., C, O]."""
    if spec.structure == "linear":
        return matmul_t(x, weights.w)
    return x + matmul_t(spec.act(matmul_t(x, weights.w2)), weights.w1)


def targets(spec: MemorySpec, boundary: Weights, v: jax.Array) -> jax.Array:
    """The regression target of each token: v itself, or M_B(v) with the boundary state (`self_target`)."""
    return apply(spec, boundary, v) if spec.self_target else v


def output_error(spec: MemorySpec, pred: jax.Array, v: jax.Array) -> jax.Array:
    """dL/dM(k) for the inner objective."""
    return pred - v if spec.objective == "l2" else -v


def token_loss(spec: MemorySpec, weights: Weights, k: jax.Array, v: jax.Array) -> jax.Array:
    """The inner objective for one token of one head (unbatched weights, k [I], v [O])."""
    pred = apply(spec, weights, k[None])[0]
    if spec.objective == "l2":
        return 0.5 * jnp.sum((pred - v) ** 2)
    return -jnp.sum(pred * v)


class Factors(NamedTuple):
    """Rank-one gradient factors per weight matrix: dL/dW_t = e_t x_t^T (same names as the weights)."""

    inputs: Any  # pytree like Weights of [..., C, I]
    errors: Any  # pytree like Weights of [..., C, O]
    key_proj: jax.Array  # the input-side weight applied to the keys, k W_in^T [..., C, O_in]


def token_errors(spec: MemorySpec, weights: Weights, k: jax.Array, v: jax.Array) -> Factors:
    """Per-token gradient factors of the objective at `weights`, for k [..., C, I], v [..., C, O]."""
    if spec.structure == "linear":
        pred = matmul_t(k, weights.w)
        return Factors(LinearWeights(k), LinearWeights(output_error(spec, pred, v)), pred)
    z = matmul_t(k, weights.w2)
    h, dh = jax.jvp(spec.act, (z,), (jnp.ones_like(z),))  # elementwise activation: jvp with ones = s'(z)
    e1 = output_error(spec, k + matmul_t(h, weights.w1), v)
    e2 = jnp.einsum("...co,...oh->...ch", e1, weights.w1) * dh
    return Factors(MLPWeights(w1=h, w2=k), MLPWeights(w1=e1, w2=e2), z)


def input_side(spec: MemorySpec) -> str:
    """Name of the weight that acts on the key: the one DGD's `W (a I - g k k^T)` term applies to."""
    return "w" if spec.structure == "linear" else "w2"


def init_weights(
    spec: MemorySpec,
    key: jax.Array,
    shape_prefix: tuple[int, ...],
    dim: int,
    value_dim: int | None = None,
    hidden: int | None = None,
    scale: float = 0.02,
) -> Weights:
    """Random initial fast weights with leading axes `shape_prefix` (e.g. (heads,) or (B, H))."""
    if spec.structure == "linear":
        dv = dim if value_dim is None else value_dim
        return LinearWeights(scale * jax.random.normal(key, (*shape_prefix, dv, dim)))
    if value_dim not in (None, dim):
        raise ValueError(f"the residual mlp memory maps D to D; value_dim {value_dim} != dim {dim}")
    hidden = dim if hidden is None else hidden
    k1, k2 = jax.random.split(key)
    return MLPWeights(
        w1=scale * jax.random.normal(k1, (*shape_prefix, dim, hidden)),
        w2=scale * jax.random.normal(k2, (*shape_prefix, hidden, dim)),
    )
