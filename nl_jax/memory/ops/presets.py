"""Known sequence models as settings of the one memory core (the Nested Learning view,
docs/design.md, Decision 13).

Each preset returns a `Mechanism`: the spec, the per-token rates and the read mode. Run it with any
form, e.g. `memory_chunked(m.spec, state, q, k, v, m.rates, chunk_size=64, read=m.read)`. Rates are
[B, T, H] arrays (or [B, H] for one decode step). Sign conventions: `retention` alpha keeps the old
state (1 = no forgetting); `lr` is the step on the inner objective.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nl_jax.memory.ops.update_rule import Rates
from nl_jax.memory.ops.structures import MemorySpec


class Mechanism(NamedTuple):
    spec: MemorySpec
    rates: Rates
    read: str


def linear_attention(lr: jax.Array, decay: jax.Array | None = None) -> Mechanism:
    """S_t = decay_t S_{t-1} + lr_t v_t k_t^T, o_t = S_t q_t.

    Hebbian memory: one GD step on -<S k, v> (Eq. 14-18 of the paper). With a fixed per-head decay and
    lr = 1 this is RetNet's retention; with decay = None it is plain linear attention.
    """
    return Mechanism(MemorySpec("linear", "dot"), Rates(lr=lr, retention=decay), "post_update")


def deep_linear_attention(
    lr: jax.Array, retention: jax.Array | None = None, structure: str = "mlp", activation: str = "silu"
) -> Mechanism:
    """DLA, deep linear attention (as the Nested Learning paper's Table 2 lists it): linear attention
    whose memory is deep, one GD step per token on the dot-product (Hebbian) objective -<M(k), v>:

        M_t = alpha_t M_{t-1} - eta_t d(-<M(k_t), v_t>)/dM,     o_t = M_t(q_t)

    With `structure="linear"` it is `linear_attention` (the gradient -v k^T is the Hebbian write).
    The MLP memory's gradient depends on the state, so it is taken at the chunk's start state (the
    core's mini-batch semantics, docs/design.md, Decision 6).
    """
    spec = MemorySpec(structure, "dot", activation)
    return Mechanism(spec, Rates(lr=lr, retention=retention), "post_update")


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


def generalized_delta_rule(decay: jax.Array, erase_key: jax.Array, erase_dir: jax.Array) -> Mechanism:
    """RWKV-7's generalised delta rule ("Goose", arXiv 2503.14456):
    S_t = S_{t-1} (diag(w_t) - c_t d_t^T) + v_t k_t^T, o_t = S_t q_t.

    `decay` w_t is a vector per key channel [B, T, H, Dk]; `erase_key` c_t and `erase_dir` d_t
    [B, T, H, Dk] shape the rank-one erase (RWKV-7: c = the normalised removal key, d = c times the
    in-context learning rate). As for the delta rule, the dot objective's gradient -v k^T does not
    depend on the state, so any chunking is exact; the chunked form is `vector_chunked`.
    """
    ones = jnp.ones(decay.shape[:-1], decay.dtype)
    rates = Rates(lr=ones, retention=decay, dgd=ones, erase_key=erase_key, erase_dir=erase_dir)
    return Mechanism(MemorySpec("linear", "dot"), rates, "post_update")


def comba(alpha: jax.Array, beta: jax.Array, p: jax.Array) -> Mechanism:
    """Comba ("Improving Bilinear RNNs with Closed-loop Control", arXiv 2506.02475), its state update:
    S_t = alpha_t S_{t-1} (I - beta_t p_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t.

    The gated delta rule whose erase reads the state at p_t [B, T, H, Dk] (Comba: a scaled key, the
    state feedback) instead of k_t; alpha, beta [B, T, H]. The output correction (q_t - d p_t) is the
    caller's query. Chunked by `vector_chunked` with one [C, C] decay matrix per head.
    """
    rates = Rates(lr=beta, retention=alpha, dgd=alpha * beta, erase_key=p)
    return Mechanism(MemorySpec("linear", "dot"), rates, "post_update")


def ttt(
    lr: jax.Array,
    structure: str = "linear",
    activation: str = "gelu",
    *,
    bias: bool = False,
    norm: bool = False,
    token_scale: jax.Array | None = None,
) -> Mechanism:
    """TTT with mini-batch GD: W_t = W_{t-1} - lr_t dL(W_B; k_t, v_t), read with the dual form W_t q_t.

    TTT-Linear or TTT-MLP by `structure`; the mini-batch is the chunk. The inner model of Sun et al.
    (2024) takes all three options: fast biases (`bias`), the inner LayerNorm with learned per-head
    scale and shift (`norm`; the l2 loss is taken after it, and the memory is then run with
    `norm=InnerNorm(...)`), and `token_scale` tau_t = 1/(position in the mini-batch + 1) (their
    `token_idx`), so token t reads W_B + tau_t (W_t - W_B) and each mini-batch hands on the mean step.
    """
    spec = MemorySpec(structure, "l2", activation, bias=bias, norm=norm)
    return Mechanism(spec, Rates(lr=lr, delta_scale=token_scale), "post_update")


def titans(
    lr: jax.Array,
    forget: jax.Array,
    surprise_decay: jax.Array | None,
    structure: str = "mlp",
    activation: str = "gelu",
) -> Mechanism:
    """Titans LMM (Titans, Section 3): S_t = eta_t S_{t-1} - theta_t dl(M_B; x_t),
    M_t = (1 - alpha_t) M_{t-1} + S_t.

    `lr` is theta, `forget` is alpha (so retention = 1 - alpha), `surprise_decay` is eta (None: no
    momentum, S_t = -theta_t dl, Titans' ablation). Retrieval y_t = M_t(q_t) after the update, as in
    Titans.
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
    self_target: bool = False,
) -> Mechanism:
    """The self-modifying Titans update (Eq. 86-91): DGD + weight decay (+ momentum,
    docs/design.md, Decision 5).

    M_t = M_{t-1} (alpha_t I - eta_t k_t k_t^T) - eta_t dL(M_B; k_t, v_hat_t), L2 objective, gradients
    at the chunk boundary. With `structure="linear"` it is a gated delta rule with modified values
    (Eq. 92-93). The self-generated values v_hat are either computed by the caller and passed as `v`,
    or, with `self_target`, generated by the memory itself from `v` with its boundary state.
    """
    return Mechanism(
        MemorySpec(structure, "l2", activation, self_target=self_target),
        Rates(lr=lr, retention=retention, momentum=momentum, dgd=lr if dgd else None),
        read,
    )
