"""What the self-modifying Titans layer (`self_modifying.py`) costs: analytic forward FLOPs per
token, the static projections apart (the part whose backward has weight gradients). The model's
MFU counts them (`nl_jax.models.hope`), and a test checks them against XLA's cost analysis."""

from __future__ import annotations

from nl_jax.mixers.self_modifying import aligned_blocks, input_projections


def projection_flops_per_token(
    d_model: int,
    num_heads: int,
    head_dim: int,
    *,
    weight_decay: bool = True,
    momentum: bool = True,
    memory_inputs: str = "shared",
    paper_literal: bool = False,
    **_,
) -> float:
    """Forward FLOPs per token of the static projections (q, k, v, eta, gate, out, [alpha], [beta];
    shared inputs: in, gate, out, [beta]): the part of the layer whose backward has weight
    gradients; the rest (convolutions, memories) is a function of the input alone."""
    d, h, dh = d_model, num_heads, head_dim
    inputs = input_projections(weight_decay=weight_decay, memory_inputs=memory_inputs, paper_literal=paper_literal)
    return float(2 * d * h * dh * (inputs + 1) + 2 * d * h * momentum)


def memory_matrices(structure: str, head_dim: int, hidden: int = 0) -> list[tuple[int, int]]:
    """(out, in) of each fast-weight matrix of one head's memory, the input side last."""
    dh, hid = head_dim, hidden or head_dim
    return [(dh, dh)] if structure == "linear" else [(dh, hid), (hid, dh)]


def forward_flops_per_token(
    seq_len: int,
    d_model: int,
    num_heads: int,
    head_dim: int,
    *,
    structure: str = "mlp",
    hidden: int = 0,
    chunk_size: int = 8,
    memory_chunk_size: int = 64,
    read: str = "boundary",
    dgd: bool = True,
    momentum: bool = True,
    weight_decay: bool = True,
    adaptive_k: bool = True,
    adaptive_v: bool = True,
    adaptive_q: bool = False,
    conv_width: int = 4,
    memory_target: str = "self",
    memory_inputs: str = "shared",
    paper_literal: bool = False,
    **_,
) -> float:
    """Analytic forward FLOPs per token of the training forward, inner updates included.

    Counts matmul-like work (2 per multiply-add) and the convolutions; elementwise activations,
    norms and the log2(C)-level triangular inverse's lower-order terms are left out. `seq_len`
    is accepted for the model interface; the cost per token does not depend on it.
    """
    del seq_len
    d, h, dh = d_model, num_heads, head_dim
    hid = hidden or dh
    mats = memory_matrices(structure, dh, hidden)
    apply = h * sum(2 * o * i for o, i in mats)  # one memory read of one token, all heads

    inputs = dict(memory_inputs=memory_inputs, paper_literal=paper_literal)
    proj = projection_flops_per_token(
        d, h, dh, weight_decay=weight_decay, momentum=momentum, **inputs
    )
    shared = input_projections(**inputs) == 2
    conv = (1 if shared else 3) * 2 * conv_width * h * dh
    readouts = 2 * h * dh * (1 + weight_decay)
    n_small = 1 + adaptive_k + adaptive_v + adaptive_q + weight_decay  # eta always
    generate = n_small * apply  # each small memory reads its input at the boundary

    def update(c, self_target, read_mode):
        """One memory over chunks of c tokens, per token: target, gradient factors, closed-form
        update (final state of each chunk), DGD solve, coefficient products, and its read."""
        f = apply * (1 + self_target)  # forward of the keys (+ the target M_B(v))
        f += 2 * h * hid * dh * (structure == "mlp")  # error backpropagated through W1
        f += h * 2 * c * c * momentum  # A Bm, A b (a C^3 product per chunk)
        for o, i in mats:
            f += h * 2 * o * i * (1 + momentum)  # sum of the chunk's rank-one terms into W (and S)
        if dgd:
            o, i = mats[-1]
            f += h * (2 * c * i + 2 * c * o)  # Gram matrix and right-hand side
            f += h * 2 * c * c / 3 + h * 2 * c * o  # triangular inverse (~2C^3/3 per chunk) and solve
            # (the DGD term of the final state shares the gradient sum's product, counted above)
        if read_mode == "boundary":
            f += apply
        elif read_mode == "per_token":
            for o, i in mats:  # dual form: Q X^T, (Cm * QX^T) E, Q W0^T (+ Q S0^T)
                f += h * (2 * c * i + 2 * c * o + 2 * o * i * (1 + momentum))
            f += h * 2 * c * mats[-1][0] * dgd  # (A * QK^T) (gamma P)
        return f

    small = n_small * update(chunk_size, True, None)
    out = update(memory_chunk_size, memory_target == "self", read)
    return float(proj + conv + readouts + generate + small + out)


def reads_from_segment_start(
    segment: int,
    *,
    chunk_size: int = 8,
    memory_chunk_size: int = 64,
    read: str = "boundary",
    adaptive_q: bool = False,
    **_,
) -> bool:
    """Whether HOPE's inner gradient (from an ntp segment's logits alone) runs the layer's read path
    alone: the segment on the small memories' chunk grid and inside one output-memory chunk (its
    length dividing the chunk), read at that chunk's boundary, q static. Its outputs then depend on
    no update inside it (the updates reach only later segments), and the output memory runs the
    segment without a scan or a branch (one chunk unscanned, or one streaming pass inside a chunk,
    `SelfModifyingTitans.core`'s aligned form), so the updates' backward is dead code."""
    one_chunk = aligned_blocks(segment, chunk_size, memory_chunk_size) and memory_chunk_size % segment == 0
    return one_chunk and read == "boundary" and not adaptive_q


def segment_backward_flops_per_token(
    segment: int,
    d_model: int,
    num_heads: int,
    head_dim: int,
    *,
    structure: str = "mlp",
    hidden: int = 0,
    conv_width: int = 4,
    **memory,
) -> float:
    """FLOPs per token of the layer's backward inside one ntp segment of `segment` tokens, from the
    segment's outputs to its input (HOPE's inner gradient: no weight gradients, no cotangent of the
    state the segment leaves behind).

    When the reads come from the segment's start state (`reads_from_segment_start`), the read path
    alone, each matmul once: the input projection and gate, the conv, the output memory's read wrt
    q, the out projection. Otherwise the reads depend on updates inside the segment, counted as the
    whole backward but the projections' weight gradients."""
    d, h, dh = d_model, num_heads, head_dim
    if reads_from_segment_start(segment, **memory):
        read = h * sum(2 * o * i for o, i in memory_matrices(structure, dh, hidden))
        return float(3 * 2 * d * h * dh + 2 * conv_width * h * dh + read)
    layer = dict(structure=structure, hidden=hidden, conv_width=conv_width, **memory)
    return 2 * forward_flops_per_token(segment, d, h, dh, **layer) - projection_flops_per_token(d, h, dh, **layer)
