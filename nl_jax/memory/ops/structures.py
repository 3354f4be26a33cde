"""Memory structures, inner objectives and the carried state of an associative memory.

A memory maps keys to values with fast weights that are updated in context. Two structures, both
per head (weights carry leading batch and head axes, `[B, H, out, in]`):

  linear  M(z) = W z                       W: [Dv, Dk]
  mlp     M(z) = z + W1 s(W2 z)            W2: [Dh, D] (input side), W1: [D, Dh]  (docs/design.md, Decision 4)

Two options of the spec make the TTT inner model (Sun et al. 2024):

  bias    each matrix gets a fast bias, M(z) = W z + b (mlp: z + W1 s(W2 z + b2) + b1). A bias is a
          weight matrix [O, 1] on a constant input 1, so every rule and closed form treats it as one
          more weight matrix (`LinearBiasWeights`, `MLPBiasWeights`).
  norm    a LayerNorm on the output branch, M(z) = LN(W z) (mlp: z + LN(W1 s(W2 z))), with per-head
          scale and shift that are not fast weights: they are passed to every form as
          `norm=InnerNorm(scale, shift)` and the inner gradient goes through the LayerNorm.

Two inner objectives, per token:

  l2   L = 1/2 ||M(k) - v||^2              (delta rule / Titans / TTT)
  dot  L = -<M(k), v>                      (Hebbian: linear attention, RetNet)

With `self_target` the memory generates its own target from the given value, v_hat = M_B(v) with
the state of the last chunk boundary (self-modifying Titans, Eq. 83-85 of the paper); the inner
gradient treats v_hat as a constant (it is the regression target), the outer gradient flows through it.

For one token the gradient of either objective with respect to every weight matrix is rank one,
`dL/dW = e x^T`, with `x` the input of that matrix and `e` the error backpropagated to its output.
The chunked and recurrent forms work with these factors (`token_errors`) instead of full gradients;
the naive form uses `jax.grad` on `token_loss`, which is how the factors are tested.

`max_grad_norm` clips each token's gradient (all of the memory's matrices together) to that global
norm, as per-sample clipping does: the update of token t is eta_t min(1, c / ||g_t||) g_t. The norm
of a rank-one gradient is ||e|| ||x||, so the factor forms clip without forming any gradient, and
since each g_t is taken at the boundary state the clipped rule keeps the mini-batch closed forms.
It bounds what one token can do to a memory whose curvature grows with its own weights (an MLP
memory's hidden activations), where plain inner GD diverges once the weights have grown.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

STRUCTURES = ("linear", "mlp")
NORM_EPS = 1e-6  # the inner LayerNorm's epsilon (flax's default, as in ttt-lm-jax)
OBJECTIVES = ("l2", "dot")
ACTIVATIONS = {"gelu": jax.nn.gelu, "silu": jax.nn.silu, "tanh": jnp.tanh, "relu": jax.nn.relu}


class LinearWeights(NamedTuple):
    w: jax.Array  # [..., Dv, Dk]


class MLPWeights(NamedTuple):
    w1: jax.Array  # [..., D, Dh]   output side
    w2: jax.Array  # [..., Dh, D]   input side: the weight that acts on the key (DGD applies here)


class LinearBiasWeights(NamedTuple):
    w: jax.Array  # [..., Dv, Dk]
    b: jax.Array  # [..., Dv, 1]   the bias, a weight on the constant input 1


class MLPBiasWeights(NamedTuple):
    w1: jax.Array  # [..., D, Dh]
    w2: jax.Array  # [..., Dh, D]
    b1: jax.Array  # [..., D, 1]    output bias
    b2: jax.Array  # [..., Dh, 1]   hidden bias


Weights = LinearWeights | MLPWeights | LinearBiasWeights | MLPBiasWeights
WEIGHT_TYPES = {
    ("linear", False): LinearWeights,
    ("mlp", False): MLPWeights,
    ("linear", True): LinearBiasWeights,
    ("mlp", True): MLPBiasWeights,
}


class InnerNorm(NamedTuple):
    """Scale and shift of the inner LayerNorm of a `norm` memory: [..., D] each, with the weights'
    leading axes or a suffix of them (e.g. [H, D] per head, shared by the batch)."""

    scale: jax.Array
    shift: jax.Array


@dataclasses.dataclass(frozen=True)
class MemorySpec:
    """Static description of a memory: structure, inner objective, MLP activation, target source,
    fast biases and the inner LayerNorm (see the module docstring)."""

    structure: str = "linear"
    objective: str = "l2"
    activation: str = "gelu"
    self_target: bool = False
    bias: bool = False
    norm: bool = False
    max_grad_norm: float = 0.0  # > 0: each token's inner gradient is scaled down to this global norm

    def __post_init__(self):
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm!r}")
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
              `boundary` mode, use this state (docs/design.md, Decision 6). Equal to `weights` at a boundary.
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
    expected = WEIGHT_TYPES[spec.structure, spec.bias]
    if not isinstance(weights, expected):
        with_bias = " with bias=True" if spec.bias else ""
        raise TypeError(
            f"{spec.structure} memory{with_bias} needs {expected.__name__}, got {type(weights).__name__}"
        )
    if spec.structure == "mlp":
        d_out, d_hid = weights.w1.shape[-2:]
        if weights.w2.shape[-2:] != (d_hid, d_out):
            raise ValueError(
                f"mlp memory needs w1 [.., D, Dh] and w2 [.., Dh, D]; got {weights.w1.shape} and {weights.w2.shape}"
            )
    if spec.bias:
        outs = {"b": weights.w} if spec.structure == "linear" else {"b1": weights.w1, "b2": weights.w2}
        for name, w in outs.items():
            if getattr(weights, name).shape[-2:] != (w.shape[-2], 1):
                raise ValueError(
                    f"bias {name} must be [.., {w.shape[-2]}, 1] (one column), got {getattr(weights, name).shape}"
                )


def check_norm(spec: MemorySpec, norm: InnerNorm | None) -> None:
    if spec.norm and not isinstance(norm, InnerNorm):
        raise ValueError(
            f"a memory with norm=True needs its LayerNorm parameters, norm=InnerNorm(scale, shift); got {norm!r}"
        )
    if not spec.norm and norm is not None:
        raise ValueError("norm parameters were given for a memory without norm=True")


def matmul_t(x, w):
    """x [..., C, I] times w[..., O, I]^T -> [..., C, O], batched over the leading axes of w."""
    return jnp.einsum("...ci,...oi->...co", x, w)


def layer_norm(z: jax.Array, norm: InnerNorm) -> jax.Array:
    """LayerNorm over the last axis of z [..., C, D] with per-head scale and shift [..., D]."""
    mean = jnp.mean(z, axis=-1, keepdims=True)
    zc = z - mean
    var = jnp.mean(zc * zc, axis=-1, keepdims=True)
    return zc * jax.lax.rsqrt(var + NORM_EPS) * norm.scale[..., None, :] + norm.shift[..., None, :]


def forward(spec: MemorySpec, matmul, x: jax.Array, norm: InnerNorm | None = None) -> jax.Array:
    """M(x), with every weight product delegated: `matmul(name, h)` = h W_name^T for inputs h [..., C, I].

    The one definition of each structure: `apply` passes the weights' products, the chunked form
    the closed-form products of the weights within a chunk.
    """

    def dense(w: str, b: str, h):
        z = matmul(w, h)
        return z + matmul(b, jnp.ones_like(h[..., :1])) if spec.bias else z

    branch = (lambda z: layer_norm(z, norm)) if spec.norm else (lambda z: z)
    if spec.structure == "linear":
        return branch(dense("w", "b", x))
    return x + branch(dense("w1", "b1", spec.act(dense("w2", "b2", x))))


def apply(spec: MemorySpec, weights: Weights, x: jax.Array, norm: InnerNorm | None = None) -> jax.Array:
    """M(x) for a block of tokens: weights [..., O, I], x [..., C, I] -> [..., C, O]."""
    return forward(spec, lambda name, h: matmul_t(h, getattr(weights, name)), x, norm)


def targets(spec: MemorySpec, boundary: Weights, v: jax.Array, norm: InnerNorm | None = None) -> jax.Array:
    """The regression target of each token: v itself, or M_B(v) with the boundary state (`self_target`)."""
    return apply(spec, boundary, v, norm) if spec.self_target else v


def output_error(spec: MemorySpec, pred: jax.Array, v: jax.Array) -> jax.Array:
    """dL/dM(k) for the inner objective."""
    return pred - v if spec.objective == "l2" else -v


def token_loss(
    spec: MemorySpec, weights: Weights, k: jax.Array, v: jax.Array, norm: InnerNorm | None = None
) -> jax.Array:
    """The inner objective for one token of one head (unbatched weights, k [I], v [O], norm [D])."""
    pred = apply(spec, weights, k[None], norm)[0]
    if spec.objective == "l2":
        return 0.5 * jnp.sum((pred - v) ** 2)
    return -jnp.sum(pred * v)


class Factors(NamedTuple):
    """Rank-one gradient factors per weight matrix: dL/dW_t = e_t x_t^T (same names as the weights)."""

    inputs: Any  # pytree like Weights of [..., C, I]
    errors: Any  # pytree like Weights of [..., C, O]
    key_proj: jax.Array  # the input-side weight applied to the keys, k W_in^T [..., C, O_in]


def _branch_error(spec: MemorySpec, pre, v, norm, residual=None):
    """dL/d(pre) where M(k) = [residual +] N(pre), N the inner LayerNorm (or the identity)."""
    if not spec.norm:
        return output_error(spec, pre if residual is None else residual + pre, v)
    out, norm_vjp = jax.vjp(lambda z: layer_norm(z, norm), pre)  # row-wise, so one vjp serves all tokens
    return norm_vjp(output_error(spec, out if residual is None else residual + out, v))[0]


def token_errors(
    spec: MemorySpec, weights: Weights, k: jax.Array, v: jax.Array, norm: InnerNorm | None = None
) -> Factors:
    """Per-token gradient factors of the objective at `weights`, for k [..., C, I], v [..., C, O].

    A bias has the constant input 1 and the error of its matrix's output."""
    cls = type(weights)
    one = jnp.ones_like(k[..., :1])
    if spec.structure == "linear":
        key_proj = matmul_t(k, weights.w)
        if not spec.bias and not spec.norm:
            e = output_error(spec, key_proj, v)
        else:
            pre = key_proj + matmul_t(one, weights.b) if spec.bias else key_proj
            e = _branch_error(spec, pre, v, norm)
        inputs, errors = dict(w=k, b=one), dict(w=e, b=e)
    else:
        key_proj = matmul_t(k, weights.w2)
        pre = key_proj + matmul_t(one, weights.b2) if spec.bias else key_proj
        # elementwise activation: jvp with ones = s'(z)
        h, dh = jax.jvp(spec.act, (pre,), (jnp.ones_like(pre),))
        out = matmul_t(h, weights.w1)
        if not spec.bias and not spec.norm:
            e1 = output_error(spec, k + out, v)
        else:
            e1 = _branch_error(spec, out + matmul_t(one, weights.b1) if spec.bias else out, v, norm, k)
        e2 = jnp.einsum("...co,...oh->...ch", e1, weights.w1) * dh
        inputs, errors = dict(w1=h, w2=k, b1=one, b2=one), dict(w1=e1, w2=e2, b1=e1, b2=e2)
    pick = lambda d: cls(**{n: d[n] for n in cls._fields})  # noqa: E731
    inputs, errors = pick(inputs), pick(errors)
    if spec.max_grad_norm:
        sq = lambda a: jnp.sum(a * a, axis=-1)  # noqa: E731
        norm_sq = sum(sq(e) * sq(x) for e, x in zip(errors, inputs))  # ||e x^T||^2 = ||e||^2 ||x||^2
        scale = grad_scale(spec, norm_sq)[..., None]
        errors = jax.tree.map(lambda e: e * scale.astype(e.dtype), errors)
    return Factors(inputs, errors, key_proj)


def grad_scale(spec: MemorySpec, norm_sq: jax.Array) -> jax.Array:
    """min(1, max_grad_norm / ||g||) from squared gradient norms; its gradient is finite at g = 0."""
    c = spec.max_grad_norm
    return c * jax.lax.rsqrt(jnp.maximum(norm_sq, c * c))


def clip_grads(spec: MemorySpec, grads):
    """One token's full gradients (pytree like the weights) clipped to `max_grad_norm` (if set)."""
    if not spec.max_grad_norm:
        return grads
    scale = grad_scale(spec, sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)


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
    """Random initial fast weights with leading axes `shape_prefix` (e.g. (heads,) or (B, H));
    biases (`spec.bias`) start at zero."""
    if spec.structure == "linear":
        dv = dim if value_dim is None else value_dim
        w = scale * jax.random.normal(key, (*shape_prefix, dv, dim))
        return LinearBiasWeights(w, jnp.zeros((*shape_prefix, dv, 1))) if spec.bias else LinearWeights(w)
    if value_dim not in (None, dim):
        raise ValueError(f"the residual mlp memory maps D to D; value_dim {value_dim} != dim {dim}")
    hidden = dim if hidden is None else hidden
    k1, k2 = jax.random.split(key)
    w1 = scale * jax.random.normal(k1, (*shape_prefix, dim, hidden))
    w2 = scale * jax.random.normal(k2, (*shape_prefix, hidden, dim))
    if spec.bias:
        zeros = lambda n: jnp.zeros((*shape_prefix, n, 1))  # noqa: E731
        return MLPBiasWeights(w1, w2, zeros(dim), zeros(hidden))
    return MLPWeights(w1=w1, w2=w2)
