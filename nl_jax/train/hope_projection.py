"""The pod projection of HOPE with the next-token CMS signal (`nl_jax.train.projection`'s model of
a step, itemised for HOPE): its forward matmuls per segment and layer (`_Fwd`), the training ops they
imply under segment checkpointing, the state it carries per sequence, and its collectives.
`projection.workload` dispatches here for `hope` / `hope_attention` with `cms.signal=ntp`.
"""

from __future__ import annotations

import dataclasses
import math

from nl_jax.parallel.topology import Slice
from nl_jax.train.projection import (
    _BF16,
    _F32,
    HIGHEST_PASSES,
    KERNELS_PER_MATMUL,
    Collective,
    Op,
    Workload,
    _fixed_bytes,
    _param_train,
    _Step,
    _step,
)


@dataclasses.dataclass(frozen=True)
class _Fwd:
    """One forward matmul of a HOPE segment: `weight` says whose the stationary operand is
    ("param": a shared bf16 weight; "fast": a per-sequence float32 CMS weight; "state": both
    operands per-sequence activations or memory states, float32). `runs` per segment (per layer
    when `layer`); `mixer`: part of the self-modifying layer (whose inner backward skips layer 0).
    `inner`: the share of the runs that the inner backward differentiates (0 for a memory update
    whose state only later segments read, self_modifying_cost.reads_from_segment_start);
    `inner_dx`: a "state" product whose inner backward needs the activation's gradient alone (a
    read of a memory state the segment starts from)."""

    kind: str
    weight: str
    m: int
    k: int
    n: int
    products: float
    runs: float
    bytes: float
    layer: bool = True
    mixer: bool = False
    passes: int = 1
    inner: float = 1.0
    inner_dx: bool = False


def _input_projections(mem) -> int:
    from nl_jax.mixers.self_modifying import input_projections  # noqa: PLC0415

    return input_projections(**mem)


def _memory_fwd(mem, s: _Step, segment: int, read_only: bool) -> list:
    """The self-modifying layer's memories per segment and layer, at their chunk shapes (the terms
    of self_modifying_cost.forward_flops_per_token, one product per term). `read_only`: the inner
    backward runs the output memory's boundary read (wrt q) and no update."""
    from nl_jax.mixers import self_modifying_cost  # noqa: PLC0415
    from nl_jax.mixers.self_modifying import SelfModifyingTitans  # noqa: PLC0415

    g = lambda key, default: mem.get(key, default)  # noqa: E731
    h = g("num_heads", 8) / s.tensor  # heads per device
    dh = g("head_dim", 128)
    hid = g("hidden", 0) or dh
    mats = self_modifying_cost.memory_matrices(g("structure", "mlp"), dh, hid)  # (out, in)
    mom, dgd = int(g("momentum", True)), bool(g("dgd", True))
    n_small = (
        1 + g("adaptive_k", True) + g("adaptive_v", True) + g("adaptive_q", False) + g("weight_decay", True)
    )
    out_self = g("memory_target", "self") == "self"
    per_token_read = g("read", "boundary") == "per_token"
    assert SelfModifyingTitans  # the layer whose terms these are
    b = s.sequences
    ops = []

    def memory(name, count, chunk, applies, read):
        r = min(chunk, segment)  # rows of a block: a chunk, or the whole segment when it is shorter
        blocks = math.ceil(segment / r)
        p = b * h * count  # products: sequences x heads x memories
        f32 = lambda *sizes: _F32 * sum(sizes)  # noqa: E731

        def add(kind, m, k, n, runs, byts, products=p, passes=1, inner=None):
            ops.append(
                _Fwd(
                    f"{name}: {kind}",
                    "state",
                    m,
                    k,
                    n,
                    products,
                    runs * blocks,
                    byts,
                    mixer=True,
                    passes=passes,
                    inner=(0.0 if read_only else 1.0) if inner is None else inner,
                    inner_dx=read_only,
                )
            )

        boundary_read = name == "output memory" and read_only  # the last of its `applies` reads
        for o, i in mats:  # reads of the memory: keys, targets, the boundary read
            add("reads", r, i, o, applies, p * f32(o * i, r * (i + o)), inner=1 / applies if boundary_read else None)
        if len(mats) == 2:
            add("error through W1", r, dh, hid, 1, p * f32(hid * dh, r * (dh + hid)))
        if mom:
            add("coefficients (A Bm)", r, r, r, 1, p * f32(3 * r * r), passes=HIGHEST_PASSES)
        for o, i in mats:  # the chunk's rank-one terms into W (and the momentum S)
            add("updates of W, S", o, r, i, 1 + mom, p * f32(2 * o * i, r * (o + i)))
        if dgd:
            o, i = mats[-1]
            add("DGD Gram", r, i, r, 1, p * f32(2 * r * i, r * r))
            add("DGD right-hand side", r, r, o, 1, p * f32(r * r, 2 * r * o))
            levels = max(1, (r - 1).bit_length())  # log2 C doubling steps of two products each
            add(
                "DGD inverse",
                r,
                r,
                r,
                2 * levels,
                p * f32(3 * r * r),
                products=p / (3 * 2 * levels),
                passes=HIGHEST_PASSES,
            )
            add("DGD solve", r, r, o, 1, p * f32(r * r, 2 * r * o))
        if read:  # dual form of the per-token read
            for o, i in mats:
                add("per-token read", r, i, r, 1, p * f32(r * i, r * r))
                add("per-token read", r, r, o, 1, p * f32(r * r, r * o))
                add("per-token read", r, i, o, 1 + mom, p * f32(o * i, r * (i + o)))
            if dgd:
                add("per-token read", r, r, mats[-1][0], 1, p * f32(r * r, r * mats[-1][0]))

    # small memories: each reads its input once (generate), then keys and self-targets (update)
    memory("small memories", n_small, g("chunk_size", 8), 3, False)
    memory(
        "output memory", 1, g("memory_chunk_size", 64), 1 + out_self + (not per_token_read), per_token_read
    )
    return ops


def _hope_fwd(cfg, s: _Step, segment: int, read_only: bool) -> list:
    """Forward matmuls of one segment: per layer the mixer and the CMS levels; the unembedding.
    `read_only` (hope): the segment's reads come from its start state, so its inner backward runs
    the mixer's read path alone (self_modifying_cost.reads_from_segment_start)."""
    d, t, b = cfg.d_model, s.tensor, s.sequences
    rows = b * segment
    act = lambda k, n: _BF16 * rows * (k + n)  # noqa: E731
    param = lambda kind, k, n, runs=1, **kw: _Fwd(  # noqa: E731
        kind, "param", rows, k, n, 1, runs, _BF16 * k * n + act(k, n), **kw
    )
    ops = []
    if cfg.name == "hope_attention":
        from nl_jax.mixers.attention import attention_dims  # noqa: PLC0415

        heads, kv, hd = attention_dims(cfg)
        ops += [
            param("attention q", d, heads * hd // t, mixer=True),
            param("attention k, v", d, kv * hd // t, 2, mixer=True),
            param("attention output", heads * hd // t, d, mixer=True),
        ]
        ctx = (s.seq_len + 1) / 2 if not cfg.sliding_window else min(cfg.sliding_window, (s.seq_len + 1) / 2)
        p, ctx = b * heads / t, int(ctx)
        for kind, k, n in (("attention scores", hd, ctx), ("attention values", ctx, hd)):
            byts = p * (_BF16 * ctx * hd + _F32 * segment * (k + n))
            ops.append(_Fwd(kind, "state", segment, k, n, p, 1, byts, mixer=True))
    else:
        m = cfg.memory
        hh, dh = m.get("num_heads", 8), m.get("head_dim", 128)
        proj = _input_projections(m)  # q, k, v, eta, gate (, alpha); shared inputs: in, gate
        # the inner backward of a layer read from its segment's start state: q's (or the shared
        # input's) projection and the gate
        ops += [param("mixer projections", d, hh * dh // t, proj, mixer=True, inner=2 / proj if read_only else 1.0)]
        if m.get("momentum", True):
            ops.append(param("mixer beta", d, max(1, hh // t), mixer=True, inner=0.0 if read_only else 1.0))
        ops += [param("mixer output", hh * dh // t, d, mixer=True), *_memory_fwd(m, s, segment, read_only)]
    for i, hidden in enumerate(cfg.cms.hidden):
        for kind, k, n in ((f"CMS {i} in: gate, up", d, 2 * hidden // t), (f"CMS {i} out", hidden // t, d)):
            ops.append(
                _Fwd(kind, "fast", segment, k, n, b, 1, b * (_F32 * k * n + _BF16 * segment * (k + n)))
            )
    ops.append(param("unembedding", d, cfg.vocab_size // t, layer=False))
    return ops


def _train_ops(fwd: list, s: _Step, layers: int, segments: int, checkpoint: int, full_remat: bool) -> list:
    """A segment's forward matmuls through the whole step: the forward, the inner backward (from
    the segment's logits, all segments but the last, mixers above layer 0; a shared weight gets dx
    only, a fast weight dx and dW), the outer backward (dx and dW of every product; weight gradients
    accumulated in float32 across the scan) and the checkpoint recompute (forward and inner
    backward again); a "full" remat policy recomputes the layers once per backward."""
    seg = segments * s.microbatches  # segment executions per step
    inner_share = (segments - 1) / segments
    redo = 1 + (checkpoint > 1)  # forward and inner backward, again when checkpointed
    ops = []
    for f in fwd:
        per = seg * f.runs * (layers if f.layer else 1)
        inner = per * inner_share * ((layers - 1) / layers if f.mixer else 1) * redo * f.inner
        extra = (2 + (checkpoint > 1)) * per if full_remat and f.layer else 0.0
        fwd_runs = per * redo + extra
        if f.weight == "state":
            state = dict(passes=f.passes, on_chip=True)
            backward = inner * (1 if f.inner_dx else 2) + 2 * per
            ops.append(Op(f.kind, f.m, f.k, f.n, f.products, fwd_runs, f.bytes, **state))
            ops.append(Op(f.kind + " (backward)", f.m, f.k, f.n, f.products, backward, f.bytes, **state))
            continue
        if f.weight == "param":
            ops += _param_train(f.kind, f.m, f.k, f.n, fwd_runs, per, in_scan=True, extra_dx=inner)
            continue
        act = _BF16 * f.m * (f.k + f.n) * f.products  # fast: per-sequence float32 weights
        dw_bytes = act + 2 * _F32 * f.k * f.n * f.products  # into the float32 accumulator
        ops.append(Op(f.kind, f.m, f.k, f.n, f.products, fwd_runs, f.bytes))
        ops.append(Op(f.kind + " (dx)", f.m, f.n, f.k, f.products, inner + per, f.bytes))
        ops.append(Op(f.kind + " (dW)", f.k, f.m, f.n, f.products, inner + per, dw_bytes))
    return ops


def _hope_state_bytes(cfg, s: _Step, segment: int, segments: int, checkpoint: int) -> float:
    """Bytes per sequence per device that the step keeps for the outer backward (analytic).

    Per layer: the CMS fast weights and their accumulators, the mixer's memory states (or the KV
    cache); per token: the memory scans' chunk states and the saved activations. Checkpointed in
    chunks of k segments: the state at each chunk start, plus one chunk recomputed at a time (its
    k segments' inputs and k x S tokens of residuals); otherwise every segment's."""
    d, t, layers, k = cfg.d_model, s.tensor, cfg.num_layers, checkpoint
    cms = sum(3 * d * h for h in cfg.cms.hidden) * _F32 / t
    accumulators = cms * (3 if cfg.cms.variant == "nested" else 1)
    per_token = _F32 * cfg.vocab_size / t / layers  # the segment's softmax, spread over the layers
    if cfg.name == "hope_attention":
        from nl_jax.mixers.attention import attention_dims  # noqa: PLC0415

        heads, kv, hd = attention_dims(cfg)
        mixer = 2 * s.seq_len * kv * hd * _BF16 / t
        per_token += _BF16 * (2 * heads + 2 * kv) * hd / t
    else:
        m = cfg.memory
        h, dh = m.get("num_heads", 8) / t, m.get("head_dim", 128)
        hid = m.get("hidden", 0) or dh
        weights = h * _F32 * (dh * dh if m.get("structure", "mlp") == "linear" else 2 * dh * hid)
        weights *= 1 + m.get("momentum", True)
        n_small = 1 + m.get("adaptive_k", True) + m.get("adaptive_v", True) + m.get("adaptive_q", False)
        n_small += m.get("weight_decay", True)
        mixer = (n_small + 1) * weights
        out_rows = min(m.get("memory_chunk_size", 64), segment)
        per_token += n_small * weights / min(m.get("chunk_size", 8), segment) + weights / out_rows
        per_token += _BF16 * ((_input_projections(m) + 1) * h * dh + d / t)
    per_token += _F32 * d * len(cfg.cms.hidden)  # residual stream into each CMS level
    if k > 1:
        kept = segments // k * (cms + accumulators + mixer) + k * (cms + mixer) + k * segment * per_token
    else:
        kept = segments * (cms + mixer) + segments * segment * per_token
    return layers * kept


def hope_workload(config, slice_: Slice) -> Workload:
    """HOPE with the ntp signal: the segment scan (see nl_jax/models/hope.py)."""
    from nl_jax.mixers import self_modifying_cost  # noqa: PLC0415 (mixers import jax)
    from nl_jax.mixers.self_modifying import aligned_blocks  # noqa: PLC0415
    from nl_jax.models.hope import _Hope  # noqa: PLC0415 (models import jax)

    cfg, s = config.model, _step(config, slice_)
    segment = min(int(p) for p in cfg.cms.periods)
    segments = -(-s.seq_len // segment)
    checkpoint = _Hope.ntp_segments_per_checkpoint(cfg, s.seq_len)
    full = cfg.remat_policy in ("full", "nothing_saveable")
    memory = cfg.get("memory", {})
    reads = cfg.name == "hope" and self_modifying_cost.reads_from_segment_start(segment, **memory)
    fwd = _hope_fwd(cfg, s, segment, reads)
    ops = _train_ops(fwd, s, cfg.num_layers, segments, checkpoint, full)
    seg, redo = segments * s.microbatches, 1 + (checkpoint > 1)
    for i, (hidden, period) in enumerate(zip(cfg.cms.hidden, cfg.cms.periods)):
        weights = 3 * cfg.d_model * hidden * _F32 / s.tensor * s.sequences
        updates = cfg.num_layers * s.microbatches * s.seq_len / int(period) * (redo + 1)
        ops.append(Op(f"CMS {i} boundary updates", 0, 0, 0, 0, updates, 3 * weights))
    logits = _F32 * s.sequences * segment * cfg.vocab_size / s.tensor
    ops.append(Op("softmax of the logits", 0, 0, 0, 0, seg * redo, 3 * logits))
    params = _hope_params(cfg)
    chunked = cfg.name == "hope_attention" or aligned_blocks(  # no streaming branch in the segment
        segment, memory.get("chunk_size", 8), memory.get("memory_chunk_size", 64)
    )
    per_matmul = KERNELS_PER_MATMUL["reads" if reads else "chunked" if chunked else "streamed"]
    return Workload(
        model=cfg.name,
        mesh=dict(data=s.data // s.fsdp, fsdp=s.fsdp, tensor=s.tensor),
        tokens_per_step=int(config.data.global_batch_size) * s.seq_len,
        sequences=s.sequences,
        microbatches=s.microbatches,
        rows=s.sequences * segment,
        ops=ops,
        collectives=_hope_collectives(fwd, s, cfg.num_layers, segments, checkpoint, params),
        segment=segment,
        segments=segments,
        checkpoint=checkpoint,
        state_bytes=_hope_state_bytes(cfg, s, segment, segments, checkpoint),
        fixed_bytes=_fixed_bytes(params, s),
        op_count=per_matmul * sum(op.runs for op in ops),
        op_source=f"estimate: {per_matmul:g} kernels per matmul, as in compiled HOPE steps",
    )


def _hope_params(cfg) -> float:
    """Parameters of the weight matmuls (analytic; the memory inits are per layer too)."""
    d = cfg.d_model
    cms = sum(3 * d * h for h in cfg.cms.hidden)
    if cfg.name == "hope_attention":
        from nl_jax.mixers.attention import attention_dims  # noqa: PLC0415

        heads, kv, hd = attention_dims(cfg)
        mixer = d * hd * (2 * heads + 2 * kv)
    else:
        m = cfg.memory
        h, dh = m.get("num_heads", 8), m.get("head_dim", 128)
        mixer = d * h * dh * (_input_projections(m) + 2) + 6 * h * dh * dh * 2
    return cfg.num_layers * (mixer + cms) + cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)


def _hope_collectives(
    fwd: list, s: _Step, layers: int, segments: int, checkpoint: int, params: float
) -> list:
    """Inside the segment scan: FSDP gathers each weight in every pass that reads it (forward,
    inner backward, outer backward, and the recompute); tensor parallelism all-reduces the output
    of every product whose contraction it splits, forward or backward. Outside: the gradient
    reduction once per microbatch (FSDP) or per step (data)."""
    seg, redo = segments * s.microbatches, 1 + (checkpoint > 1)
    out = []
    for f in fwd:
        if f.weight == "state":
            continue
        per = seg * f.runs * (layers if f.layer else 1)
        if s.fsdp > 1 and f.weight == "param":
            moved = _BF16 * f.k * f.n * (s.fsdp - 1) / s.fsdp
            out.append(Collective(f"all-gather ({f.kind})", s.fsdp, moved, per * (2 * redo + 1), True))
        if s.tensor > 1:
            split_k = f.kind.endswith("output") or f.kind.endswith("out")
            width = f.n if split_k else f.k  # forward output, or the dx of a column-split product
            moved = 2 * _BF16 * f.m * width * f.products * (s.tensor - 1) / s.tensor
            runs = per * (redo if split_k else redo + 1)
            out.append(Collective(f"all-reduce ({f.kind})", s.tensor, moved, runs, True))
    grads = _F32 * params / (s.fsdp * s.tensor)
    if s.fsdp > 1:
        moved = grads * (s.fsdp - 1)
        out.append(Collective("reduce-scatter (gradients)", s.fsdp, moved, s.microbatches, False))
    replicas = s.data // s.fsdp
    if replicas > 1:
        out.append(
            Collective("all-reduce (gradients)", replicas, 2 * grads * (replicas - 1) / replicas, 1, False)
        )
    return out
