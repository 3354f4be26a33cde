"""Projected step time of a train step on a TPU slice, per device, from the config alone.

A FLOPs-at-peak roofline says nothing about a program whose matmuls have 16 rows: a 128 x 128
systolic array then idles most of its cycles, and a sequential scan of thousands of such steps pays
a fixed cost per operation. The projection lists the matmuls of one device's share of a step
(`Op`: rows M, contraction K, columns N, how many products each execution does and how often it
runs) and prices each execution as

    max(FLOPs / (peak x MXU efficiency), HBM bytes / HBM bandwidth) + OP_SECONDS

The MXU efficiency of an M x K x N product is min(1, M / A) x K / pad(K) x N / pad(N) on an A x A
array (A = 128 on v4 / v5e / v5p, 256 on v6e; pad rounds up to a multiple of A): the stationary
K x N operand is cut into A x A tiles, and streaming M < A rows through a tile cannot hide the A
cycles of loading the next one. float32 products at HIGHEST precision take 6 bf16 passes. HBM
bytes are every operand read and every result written once per execution: the whole model's
weights do not fit in on-chip memory, so a weight used once per segment is read once per segment;
per-sequence fast weights and memory states are float32. `OP_SECONDS` is the fixed cost of one
executed operation (operand DMA latency and pipeline fill, on the order of the shortest ops of a TPU
profile): it is what a scan of many tiny steps pays per op. Elementwise work (norms, gates,
convolutions, softmax) is left out but for its share of that op count.

Collectives (`Collective`): each costs (group - 1) x HOP_SECONDS + bytes moved / ICI bandwidth.
Those inside the HOPE segment scan wait on the layer before them and are counted in full; the
others (gradient reductions, FSDP gathers of a layer scan) overlap with compute and only their
excess over it counts.

    step = sum of op times + op count x OP_SECONDS + exposed collectives;  tokens/s = tokens / step

Models: HOPE with the ntp signal (`hope`, `hope_attention`, in `nl_jax.train.hope_projection`: the
segment scan, its inner backward, the outer backward and the checkpoint recompute, every memory of
the self-modifying layer at its chunk shapes), Transformer++ (`transformer`), and any other model as dense matmuls of its analytic
FLOPs at rows = its tokens per device (chunked inner loops of recurrent baselines not itemised).
`nl_jax.train.aot` replaces the op count, the collectives and the memory figures with those of the
compiled program when there is one.
"""

from __future__ import annotations

import dataclasses
import math

from nl_jax.parallel.mesh import MESH_AXES, mesh_shape_from_config
from nl_jax.parallel.topology import GiB, Slice

# Systolic array side per generation (Cloud TPU system architecture pages: 128 x 128 MXUs on v4,
# v5e and v5p, 256 x 256 on v6e).
MXU_SIDE = {"v4": 128, "v5e": 128, "v5p": 128, "v6e": 256}
OP_SECONDS = 1e-6  # fixed cost of one executed HLO op
# Executed HLO kernels per matmul of a HOPE ntp step (the elementwise fusions, copies and slices
# around each product), as counted by nl_jax.train.aot.profile_hlo in compiled steps of hope_760m on
# v5p-64: segments one output-memory chunk long or inside one, whose inner pass runs the memories'
# reads alone (self_modifying_cost.reads_from_segment_start), 5.7 (S = 64, data32: 30,708,953
# compiled ops against the projection's 5,365,248 matmul executions; the defaults, S = 16 inside
# chunks of 64: 211,588,168 against 34,773,888, 6.1); segments on the memories' chunk grids whose
# inner pass runs the updates too, 6.7 (measured at S = 64 before the inner pass read alone);
# segments off the output memory's grid, whose streaming form runs both passes of every block,
# 14.2 (S = 16 in chunks of 64 before those segments ran aligned). (hope_tiny on v5p-8, before the
# inner pass read alone: 6.0, 92,316 compiled ops against 15,407 matmul executions.)
KERNELS_PER_MATMUL = {"reads": 5.7, "chunked": 6.7, "streamed": 14.2}
HOP_SECONDS = 1e-6  # ICI latency per hop of a collective ring
HIGHEST_PASSES = 6  # bf16 MXU passes of a float32 product at Precision.HIGHEST
_BF16, _F32 = 2, 4


@dataclasses.dataclass(frozen=True)
class Op:
    """One kind of operation of the step on one device.

    `runs` executions per step (each one HLO op), each doing `products` independent M x K x N
    products (sequences x heads of a batched matmul) and moving `bytes` through HBM. M = K = N = 0:
    not a matmul (an elementwise pass over `bytes`)."""

    kind: str
    m: int
    k: int
    n: int
    products: float
    runs: float
    bytes: float
    passes: int = 1
    in_scan: bool = True  # inside the sequential segment scan
    on_chip: bool = False  # operands stay in VMEM: compute time only

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n * self.products * self.runs

    def efficiency(self, side: int) -> float:
        if not self.m:
            return 1.0
        pad = lambda d: d / (side * math.ceil(d / side))  # noqa: E731
        return min(1.0, self.m / side) * pad(self.k) * pad(self.n) / self.passes

    def seconds(self, slice_: Slice) -> float:
        """Work time of all runs (the fixed cost per op is added by the caller)."""
        chip = slice_.chip
        compute = self.flops / (chip.peak_bf16_flops * self.efficiency(MXU_SIDE[slice_.generation]))
        return compute if self.on_chip else max(compute, self.runs * self.bytes / chip.hbm_bandwidth)


@dataclasses.dataclass(frozen=True)
class Collective:
    """`runs` collectives per step over groups of `group` devices, each moving `bytes` per device."""

    kind: str
    group: int
    bytes: float
    runs: float
    in_scan: bool

    def seconds(self, slice_: Slice) -> float:
        return self.runs * ((self.group - 1) * HOP_SECONDS + self.bytes / slice_.chip.ici_bandwidth)


@dataclasses.dataclass
class Workload:
    """One device's share of a train step, as the projection sees it."""

    model: str
    mesh: dict  # axis -> size
    tokens_per_step: int  # whole slice
    sequences: int  # per device per microbatch
    microbatches: int
    rows: int  # rows of the weight matmuls: sequences x tokens per scan step
    ops: list
    collectives: list
    segment: int = 0  # tokens per segment of the sequential scan (0: no segment scan)
    segments: int = 0  # per sequence
    checkpoint: int = 1  # segments per checkpointed chunk
    state_bytes: float = 0.0  # per sequence per device, kept for the backward (analytic)
    fixed_bytes: float = 0.0  # per device: parameters, optimizer state, gradients
    op_count: float | None = None  # executed HLO ops per step; None: the matmul runs (a lower bound)
    op_source: str = "matmuls only: a lower bound"
    note: str = ""  # what the inventory leaves out

    @property
    def scan_iterations(self) -> int:
        return self.segments * self.microbatches

    def sequences_allowed(self, hbm_bytes: float) -> int:
        """Sequences per device per microbatch that the analytic state leaves room for."""
        if not self.state_bytes:
            return 0
        return max(0, int((hbm_bytes - self.fixed_bytes) // self.state_bytes))


@dataclasses.dataclass
class Projection:
    workload: Workload
    slice: Slice
    compute_seconds: float  # ops at their MXU efficiency or HBM bound, whichever is slower
    op_seconds: float  # fixed cost of every executed op
    collective_seconds: float  # exposed
    scan_collective_seconds: float  # inside the segment scan (all exposed)

    @property
    def step_seconds(self) -> float:
        return self.compute_seconds + self.op_seconds + self.collective_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.workload.tokens_per_step / self.step_seconds


def project(w: Workload, slice_: Slice) -> Projection:
    compute = sum(op.seconds(slice_) for op in w.ops)
    ops = w.op_count if w.op_count is not None else sum(op.runs for op in w.ops)
    scan = sum(c.seconds(slice_) for c in w.collectives if c.in_scan)
    rest = sum(c.seconds(slice_) for c in w.collectives if not c.in_scan)
    exposed = scan + max(0.0, rest - compute)
    return Projection(w, slice_, compute, ops * OP_SECONDS, exposed, scan)


# ---------------------------------------------------------------- shapes of a step


@dataclasses.dataclass(frozen=True)
class _Step:
    seq_len: int
    sequences: int  # per device per microbatch
    microbatches: int
    data: int  # data x fsdp: devices the batch is split over
    fsdp: int
    tensor: int
    devices: int


def _step(config, slice_: Slice) -> _Step:
    ici, dcn = mesh_shape_from_config(config.mesh, slice_.chips, slice_.num_slices)
    sizes = dict(zip(MESH_AXES, (a * b for a, b in zip(ici, dcn))))
    gbs, accum = int(config.data.global_batch_size), int(config.train.grad_accum_steps)
    shards = sizes["data"] * sizes["fsdp"]
    sequences = gbs // accum // shards
    if sequences < 1:
        raise ValueError(f"{gbs} sequences in {accum} microbatches do not cover the {shards} batch shards")
    return _Step(
        int(config.data.seq_len), sequences, accum, shards, sizes["fsdp"], sizes["tensor"], slice_.num_devices
    )


def _param_train(kind, m, k, n, runs_fwd, runs_bwd, *, in_scan, extra_dx=0.0):
    """A matmul with a shared (parameter) weight: bf16 weight and activations; its weight gradient
    is accumulated in float32 across the scan (read and written each time). `runs_bwd` backward
    passes have dx and dW, `extra_dx` passes (inner backward) dx only."""
    act = _BF16 * m * (k + n)
    fwd = Op(kind, m, k, n, 1, runs_fwd, _BF16 * k * n + act, in_scan=in_scan)
    dx = Op(kind + " (dx)", m, n, k, 1, runs_bwd + extra_dx, _BF16 * k * n + act, in_scan=in_scan)
    dw = Op(kind + " (dW)", k, m, n, 1, runs_bwd, 2 * _F32 * k * n + act, in_scan=in_scan)
    return [fwd, dx, dw]


# ---------------------------------------------------------------- Transformer++ and the fallback


def transformer_workload(config, slice_: Slice) -> Workload:
    """Transformer++ (attention + SwiGLU): the layer scan once per microbatch, rows = tokens per
    device per microbatch."""
    from nl_jax.mixers.attention import attention_dims  # noqa: PLC0415 (layers import jax)

    cfg, s = config.model, _step(config, slice_)
    heads, kv, hd = attention_dims(cfg)
    d, t, layers, rows = cfg.d_model, s.tensor, cfg.num_layers, s.sequences * s.seq_len
    full = cfg.remat_policy in ("full", "nothing_saveable")
    fwd, bwd = s.microbatches * (1 + full), s.microbatches
    per_layer = [
        ("attention projections", d, (heads + 2 * kv) * hd // t),
        ("attention output", heads * hd // t, d),
        ("MLP in (gate, up)", d, 2 * cfg.mlp_hidden // t),
        ("MLP out", cfg.mlp_hidden // t, d),
    ]
    ops = []
    for kind, k, n in per_layer:
        ops += _param_train(kind, rows, k, n, fwd * layers, bwd * layers, in_scan=False)
    keys = min(cfg.sliding_window or s.seq_len, s.seq_len / 2)  # causal: half the keys on average
    products = s.sequences * heads // t
    for kind, k, n in (("attention scores", hd, keys), ("attention values", keys, hd)):
        b = products * _BF16 * (s.seq_len * (k + n) + k * n)
        ops.append(Op(kind, s.seq_len, int(k), int(n), products, (fwd + 2 * bwd) * layers, b, in_scan=False))
    ops += _param_train("unembedding", rows, d, cfg.vocab_size // t, fwd, bwd, in_scan=False)
    return _layer_scan_workload(config, s, rows, ops, _transformer_params(cfg), layers)


def _transformer_params(cfg) -> float:
    from nl_jax.mixers.attention import attention_dims  # noqa: PLC0415

    heads, kv, hd = attention_dims(cfg)
    d = cfg.d_model
    layer = d * hd * (2 * heads + 2 * kv) + 3 * d * cfg.mlp_hidden
    return cfg.num_layers * layer + cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)


def _fixed_bytes(params: float, s: _Step) -> float:
    """float32 weights, two Adam moments and the gradient, split over fsdp x tensor."""
    return 4 * _F32 * params / (s.fsdp * s.tensor)


def _layer_scan_workload(
    config, s: _Step, rows: int, ops: list, params: float, layers: int, note: str = ""
) -> Workload:
    """A model whose layers run in one scan outside any segment scan (no sequential depth per token)."""
    return Workload(
        model=config.model.name,
        mesh=dict(data=s.data // s.fsdp, fsdp=s.fsdp, tensor=s.tensor),
        tokens_per_step=int(config.data.global_batch_size) * s.seq_len,
        sequences=s.sequences,
        microbatches=s.microbatches,
        rows=rows,
        ops=ops,
        collectives=_layer_scan_collectives(params / layers, layers, s),
        fixed_bytes=_fixed_bytes(params, s),
        note=note,
    )


def _layer_scan_collectives(layer_params: float, layers: int, s: _Step) -> list:
    """FSDP: each layer's weights gathered (bf16) in the forward and the backward and its gradient
    reduce-scattered (float32), per microbatch; data: one gradient all-reduce per step."""
    out = []
    if s.fsdp > 1:
        shard = layer_params / s.tensor
        moved = (s.fsdp - 1) / s.fsdp
        runs = layers * s.microbatches
        out.append(Collective("all-gather (weights)", s.fsdp, _BF16 * shard * moved, 2 * runs, False))
        out.append(Collective("reduce-scatter (gradients)", s.fsdp, _F32 * shard * moved, runs, False))
    replicas = s.data // s.fsdp
    if replicas > 1:
        grads = _F32 * layer_params * layers / (s.fsdp * s.tensor)
        out.append(
            Collective("all-reduce (gradients)", replicas, 2 * grads * (replicas - 1) / replicas, 1, False)
        )
    return out


def dense_workload(config, slice_: Slice, model_cls, param_count: int) -> Workload:
    """Any other model: its analytic train FLOPs as d_model-wide weight matmuls at rows = tokens
    per device per microbatch (forward, dx and dW of equal size)."""
    from nl_jax.metrics.flops import train_flops_per_token  # noqa: PLC0415

    cfg, s = config.model, _step(config, slice_)
    train, _ = train_flops_per_token(model_cls, cfg, s.seq_len, param_count)
    d, layers, rows = cfg.d_model, max(1, int(cfg.get("num_layers", 1))), s.sequences * s.seq_len
    n = max(1, round(train / 3 / (2 * d * layers) / s.tensor))  # per layer, so 3 products give `train`
    ops = _param_train(
        "all matmuls", rows, d, n, layers * s.microbatches, layers * s.microbatches, in_scan=False
    )
    note = "dense matmuls of the analytic FLOPs; inner loops not itemised, so an upper bound"
    return _layer_scan_workload(config, s, rows, ops, param_count, layers, note=note)


def workload(config, slice_: Slice, model_cls=None, param_count: int = 0) -> Workload:
    """The workload of `config` on `slice_`: HOPE ntp and Transformer++ itemised, others dense."""
    name = config.model.name
    if name in ("hope", "hope_attention") and config.model.cms.signal == "ntp":
        # imported here: that module builds on this one's Op, Workload and step
        from nl_jax.train.hope_projection import hope_workload  # noqa: PLC0415

        return hope_workload(config, slice_)
    if name == "transformer":
        return transformer_workload(config, slice_)
    if model_cls is None:
        from nl_jax.models.registry import get_model_class  # noqa: PLC0415

        model_cls = get_model_class(name)
    return dense_workload(config, slice_, model_cls, param_count or int(_transformer_params(config.model)))


def with_compiled(w: Workload, profile) -> Workload:
    """`w` with the op count and collectives of the compiled program (an aot.HloProfile). A
    collective that runs at least once per checkpointed chunk of every microbatch's segment scan
    (and more often than once per microbatch) is inside the scan."""
    per_scan = w.microbatches * max(1, w.segments // w.checkpoint) if w.segments else math.inf
    collectives = [
        Collective(c.op, c.group, c.bytes, c.runs, c.runs >= per_scan and c.runs > w.microbatches)
        for c in profile.collectives
    ]
    return dataclasses.replace(w, op_count=profile.ops, op_source="compiled HLO", collectives=collectives)


def _grouped(ops: list, slice_: Slice) -> list:
    """Ops by kind (a product and its backward together): (kind, forward shape, efficiency, runs, seconds)."""
    groups = {}
    for op in ops:
        kind = op.kind.split(" (")[0]
        g = groups.setdefault(kind, [op, 0.0, 0.0])
        g[1] += op.runs
        g[2] += op.seconds(slice_)
    return [(kind, g[0], g[1], g[2]) for kind, g in groups.items()]


def describe(p: Projection, baseline: tuple[str, Projection] | None = None, top: int = 6) -> list[str]:
    """A few lines: the chip, the scan, rows against the MXU, memory, collectives, ops, step time."""
    w, s = p.workload, p.slice
    chip, side = s.chip, MXU_SIDE[s.generation]
    ops = w.op_count if w.op_count is not None else sum(op.runs for op in w.ops)
    peak, hbm, ici = chip.peak_bf16_flops / 1e12, chip.hbm_bandwidth / 1e9, chip.ici_bandwidth / 1e9
    op_us = OP_SECONDS * 1e6
    lines = [
        f"projection      per device of {s.name}: {side}x{side} MXU, {peak:.0f} TFLOP/s, {hbm:,.0f} GB/s "
        f"HBM, {ici:,.0f} GB/s ICI, {op_us:g} us per executed op (README, TPU pods)"
    ]
    if w.segments:
        redo = f", checkpointed every {w.checkpoint} segments (recomputed once)" if w.checkpoint > 1 else ""
        lines.append(
            f"  segment scan  {w.segments} segments of {w.segment} tokens x {w.microbatches} microbatch(es) "
            f"= {w.scan_iterations:,} sequential iterations per step{redo}"
        )
    if w.note:
        lines.append(f"  model         {w.model}: {w.note}")
    tokens = w.segment or w.rows // max(1, w.sequences)
    lines.append(
        f"  rows          {w.sequences} sequence(s) per device x {tokens} tokens = {w.rows:,} rows per "
        f"weight matmul (MXU {side}: {min(1, w.rows / side):.0%} of its rows)"
    )
    lines.append("  matmuls       slowest kinds (forward shape M x K x N, MXU efficiency, time per step):")
    for kind, op, _, seconds in sorted(_grouped(w.ops, s), key=lambda g: -g[3])[:top]:
        shape = f"{op.m} x {op.k} x {op.n}" if op.m else "elementwise"
        shape += f" x {op.products:.3g}" if op.products > 1 else ""
        efficiency = f"{100 * op.efficiency(side):.3g}%"
        lines.append(f"                  {kind:<34} {shape:<24} {efficiency:>7}  {seconds:8.3f} s")
    if w.state_bytes:
        fit = w.sequences_allowed(chip.hbm_bytes)
        lines.append(
            f"  memory        {w.state_bytes / GiB:.1f} GiB kept per sequence for the backward (analytic): "
            f"{fit} sequence(s) per device fit in {chip.hbm_bytes / GiB:.0f} GiB, {w.sequences} used"
        )
    if w.segments:
        per_iteration = {}
        for c in (c for c in w.collectives if c.in_scan):
            kind = c.kind.split(" (")[0]
            n, b = per_iteration.get(kind, (0.0, 0.0))
            per_iteration[kind] = (n + c.runs / w.scan_iterations, b + c.runs * c.bytes / w.scan_iterations)
        text = ", ".join(f"{n:,.0f} {k} ({b / 2**20:,.1f} MiB)" for k, (n, b) in per_iteration.items())
        lines.append(
            f"  collectives   per segment: {text or 'none'}; {p.scan_collective_seconds:.3f} s per step, "
            "not overlapped"
        )
    rest = p.collective_seconds - p.scan_collective_seconds
    lines.append(f"  collectives   outside the scan: {rest:.3f} s per step not hidden behind compute")
    per = f", {ops / w.scan_iterations:,.0f} per segment iteration" if w.segments else ""
    lines.append(f"  ops           {ops:,.0f} executed per step{per} ({w.op_source}): {p.op_seconds:.3f} s")
    lines.append(
        f"  step          work {p.compute_seconds:.3f} s + ops {p.op_seconds:.3f} s + collectives "
        f"{p.collective_seconds:.3f} s = {p.step_seconds:.3f} s: {p.tokens_per_second:,.0f} tokens/s"
    )
    if baseline:
        name, b = baseline
        lines.append(
            f"  vs            {name} (analytic projection, not compiled): {b.step_seconds:.3f} s, "
            f"{b.tokens_per_second:,.0f} tokens/s; this config projects to "
            f"{p.tokens_per_second / b.tokens_per_second:.2%} of it"
        )
    return lines
