"""Known sequence models as settings of the one memory core (the Nested Learning view, paper 3.3-4.7).

Each preset returns a `Mechanism`: the spec, the per-token rates and the read mode. Run it with any
form, e.g. `memory_chunked(m.spec, state, q, k, v, m.rates, chunk_size=64, read=m.read)`. Rates are
[B, T, H] arrays (or [B, H] for one decode step). Sign conventions: `retention` alpha keeps the old
state (1 = no forgetting); `lr` is the step on the inner objective.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from nl_jax.memory.ops.rules import Rates
from nl_jax.memory.ops.structures import MemorySpec


class Mechanism(NamedTuple):
    spec: MemorySpec
    rates: Rates
    read: str


def linear_attention(lr: jax.Array, decay: jax.Array | None = None) -> Mechanism:
    """S_t = decay_t S_{t-1} + lr_t v_t k_t^T, o_t = S_t q_t.

    Hebbian memory: one GD step on -<S k, v> (paper 1, A-Eq.14-18). With a fixed per-head decay and
    lr = 1 this is RetNet's retention; with decay = None it is plain linear attention.
    """
    return Mechanism(MemorySpec("linear", "dot"), Rates(lr=lr, retention=decay), "post_update")


def delta_rule(beta: jax.Array) -> Mechanism:
    """DeltaNet: S_t = S_{t-1} - beta_t (S_{t-1} k_t - v_t) k_t^T, o_t = S_t q_t.

    As the dot objective with a DGD term of the same rate: the gradient -v k^T does not depend on the
    state, so chunking is exact, and the DGD term supplies the erase with the running state.
    """
    return Mechanism(MemorySpec("linear", "dot"), Rates(lr=beta, dgd=beta), "post_update")


def gated_delta_rule(alpha: jax.Array, beta: jax.Array) -> Mechanism:
    """Gated DeltaNet: S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t."""
    return Mechanism(
        MemorySpec("linear", "dot"), Rates(lr=beta, retention=alpha, dgd=alpha * beta), "post_update"
    )


def ttt(lr: jax.Array, structure: str = "linear", activation: str = "gelu") -> Mechanism:
    """TTT with mini-batch GD: W_t = W_{t-1} - lr_t dL(W_B; k_t, v_t), read with the dual form W_t q_t.

    TTT-Linear or TTT-MLP by `structure`; the mini-batch is the chunk.
    """
    return Mechanism(MemorySpec(structure, "l2", activation), Rates(lr=lr), "post_update")


def titans(
    lr: jax.Array,
    forget: jax.Array,
    surprise_decay: jax.Array,
    structure: str = "mlp",
    activation: str = "gelu",
) -> Mechanism:
    """Titans LMM (paper 3.1): S_t = eta_t S_{t-1} - theta_t dl(M_B; x_t), M_t = (1 - alpha_t) M_{t-1} + S_t.

    `lr` is theta, `forget` is alpha (so retention = 1 - alpha), `surprise_decay` is eta. Retrieval
    y_t = M_t(q_t) after the update, as in Titans.
    """
    return Mechanism(
        MemorySpec(structure, "l2", activation),
        Rates(lr=lr, retention=1.0 - forget, momentum=surprise_decay),
        "post_update",
    )


def self_modifying(
    lr: jax.Array,
    retention: jax.Array,
    momentum: jax.Array | None = None,
    structure: str = "mlp",
    activation: str = "gelu",
    read: str = "per_token",
    dgd: bool = True,
) -> Mechanism:
    """The self-modifying Titans update (paper 4.4, 4.6): DGD + weight decay (+ momentum, SPEC D5).

    M_t = M_{t-1} (alpha_t I - eta_t k_t k_t^T) - eta_t dL(M_B; k_t, v_hat_t), L2 objective, gradients
    at the chunk boundary. With `structure="linear"` it is a gated delta rule with modified values
    (paper 4.7). The self-generated values v_hat are computed by the layer and passed as `v`.
    """
    return Mechanism(
        MemorySpec(structure, "l2", activation),
        Rates(lr=lr, retention=retention, momentum=momentum, dgd=lr if dgd else None),
        read,
    )
