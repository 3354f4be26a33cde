"""The projected step time: MXU efficiency, the matmul inventory against hand counts, the HLO profile."""

import math

import pytest

from experiments import configs
from nl_jax.metrics.flops import estimate_forward_flops_per_token
from nl_jax.models.registry import get_model_class
from nl_jax.parallel.topology import parse_slice
from nl_jax.train import projection as P
from nl_jax.train.aot import HloCollective, HloProfile, profile_hlo

V5E4 = parse_slice("v5e-4")
GLOBAL_BATCH, SEQ_LEN = 8, 64


def _hope(remat="none"):
    """A 4-layer HOPE, ntp, 4 segments of 16 tokens, 2 sequences per device on v5e-4 (fsdp 4)."""
    config = configs.load("hope_tiny")
    config.data.update(global_batch_size=GLOBAL_BATCH, seq_len=SEQ_LEN)
    config.model.update(d_model=128, num_layers=4, vocab_size=260, remat_policy=remat)
    # Per-memory projections: the hand counts below name each of them.
    config.model.memory.update(
        num_heads=4, head_dim=32, chunk_size=8, memory_chunk_size=16, memory_inputs="projected"
    )
    config.model.cms.update(periods=(16, 64), hidden=(192, 192), signal="ntp", variant="sequential")
    return config


def _by_kind(work, kind):
    return next(op for op in work.ops if op.kind == kind)


def test_mxu_efficiency_is_rows_and_tile_padding():
    assert P.Op("x", 16, 1536, 384, 1, 1, 0).efficiency(128) == pytest.approx(16 / 128)
    assert P.Op("x", 8, 128, 128, 1, 1, 0).efficiency(128) == pytest.approx(1 / 16)
    assert P.Op("x", 4096, 130, 130, 1, 1, 0).efficiency(128) == pytest.approx((130 / 256) ** 2)
    assert P.Op("x", 8, 8, 8, 1, 1, 0, passes=6).efficiency(128) == pytest.approx(1 / 16**3 / 6)
    assert P.Op("x", 128, 128, 128, 1, 1, 0).efficiency(256) == pytest.approx(1 / 8)
    # Time: the slower of compute at that efficiency and the HBM traffic; on-chip operands: compute.
    chip = V5E4.chip
    op = P.Op("x", 16, 1024, 1024, 1, 10, 4e6)
    compute = 10 * 2 * 16 * 1024 * 1024 / (chip.peak_bf16_flops * 16 / 128)
    assert op.seconds(V5E4) == pytest.approx(max(compute, 10 * 4e6 / chip.hbm_bandwidth))
    assert 10 * 4e6 / chip.hbm_bandwidth > compute  # 16 rows of a 1024 x 1024 weight: HBM-bound
    on_chip = P.Op("x", 16, 1024, 1024, 1, 10, 4e6, on_chip=True)
    assert on_chip.seconds(V5E4) == pytest.approx(compute)


def test_hope_segment_scan_rows_and_runs():
    config = _hope()
    work = P.workload(config, V5E4)
    cfg = config.model
    assert work.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert (work.segment, work.segments, work.sequences, work.microbatches) == (16, 4, 2, 1)
    assert work.checkpoint == 1 and work.scan_iterations == 4
    # Weight matmuls: 2 sequences x 16 tokens = 32 rows; q, k, v, eta, gate, alpha in every layer
    # of every segment.
    proj = _by_kind(work, "mixer projections")
    assert (proj.m, proj.k, proj.n) == (32, cfg.d_model, 4 * 32)
    assert proj.runs == 4 * cfg.num_layers * 6
    # CMS: per-sequence fast weights, so one 16-row product per sequence.
    cms = _by_kind(work, "CMS 0 in: gate, up")
    assert (cms.m, cms.k, cms.n, cms.products) == (16, cfg.d_model, 2 * 192, 2)
    # Memories: chunks of 8 (small, 2 per segment) and 16 (output) rows, per sequence and head.
    small = _by_kind(work, "small memories: reads")
    assert (small.m, small.k, small.n, small.products) == (8, 32, 32, 2 * 4 * 4)  # 4 small memories
    assert small.runs == 4 * cfg.num_layers * 2 * 3  # 2 chunks, 3 reads each (generate, key, target)
    assert _by_kind(work, "output memory: reads").m == 16
    # Inner backward: every segment but the last, dx only for a shared weight. The segment is one
    # output-memory chunk, so the inner backward reads alone: the projections of q and the gate
    # (2 of 6), the output memory's boundary read (dx only), no small memory.
    dx = _by_kind(work, "unembedding (dx)")
    assert dx.runs == 4 + 3
    assert _by_kind(work, "mixer projections (dx)").runs == proj.runs + 4 * 2 * (cfg.num_layers - 1) * 3 / 4
    assert _by_kind(work, "small memories: reads (backward)").runs == 2 * small.runs
    out = _by_kind(work, "output memory: reads")
    assert _by_kind(work, "output memory: reads (backward)").runs == 2 * out.runs + 1 * (cfg.num_layers - 1) * 3


@pytest.mark.parametrize(
    ("memory_chunk", "read", "per_matmul"),
    [
        (16, "boundary", "5.7"),
        (32, "boundary", "5.7"),
        (8, "boundary", "6.7"),
        (32, "per_token", "6.7"),
        (24, "boundary", "14.2"),
    ],
)
def test_hope_op_estimate_follows_how_the_segment_runs(memory_chunk, read, per_matmul):
    """Kernels per matmul: a segment of one output-memory chunk or inside one (its inner pass reads
    alone), of several chunks (scanned) or inside one but read per token (the inner pass runs the
    updates), or off the output memory's grid (streamed, two passes a block)."""
    config = _hope()
    config.model.memory.update(memory_chunk_size=memory_chunk, read=read)
    work = P.workload(config, V5E4)
    assert work.op_source == f"estimate: {per_matmul} kernels per matmul, as in compiled HOPE steps"
    assert work.op_count == pytest.approx(float(per_matmul) * sum(op.runs for op in work.ops))


@pytest.mark.parametrize("remat", ["none", "dots_with_no_batch_dims_saveable"])
def test_hope_flops_are_the_models_train_and_recompute_flops(remat):
    """The inventory's FLOPs are the model's own count (nl_jax.models.hope), less the vector-unit
    work it leaves out: the convolutions and the rate read-outs of every mixer; in the inner
    backward (the segment's reads come from its start state) q's convolution alone."""
    config = _hope(remat)
    cfg, cls = config.model, get_model_class("hope")
    work = P.workload(config, V5E4)
    segments, layers = 4, cfg.num_layers
    m = cfg.memory
    conv = 2 * m.conv_width * m.num_heads * m.head_dim
    vpu = 3 * conv + 2 * m.num_heads * m.head_dim * 2
    inner = (layers - 1) * conv * (segments - 1) / segments
    per_token = cls.train_flops_per_token(cfg, SEQ_LEN) - 3 * layers * vpu - inner
    if remat != "none":
        assert work.checkpoint == 2  # sqrt(4 segments)
        per_token += cls.recompute_flops_per_token(cfg, SEQ_LEN) - layers * vpu - inner
    tokens = GLOBAL_BATCH * SEQ_LEN / V5E4.num_devices
    assert sum(op.flops for op in work.ops) == pytest.approx(per_token * tokens, rel=1e-9)


def test_transformer_flops_rows_and_fsdp_collectives():
    config = configs.load("transformer_tiny")
    config.data.update(global_batch_size=GLOBAL_BATCH, seq_len=SEQ_LEN)
    cfg = config.model
    work = P.workload(config, V5E4)
    assert work.rows == 2 * SEQ_LEN and not work.segments  # tokens per device, no segment scan
    norms = (2 * cfg.num_layers + 1) * cfg.d_model  # RMSNorm scales: dense parameters to the estimate
    fwd = estimate_forward_flops_per_token(cfg, SEQ_LEN, P._transformer_params(cfg) + norms)
    tokens = GLOBAL_BATCH * SEQ_LEN / 4
    assert sum(op.flops for op in work.ops) == pytest.approx(3 * (fwd - 2 * norms) * tokens, rel=1e-9)
    # FSDP over 4: each layer gathered twice per microbatch (forward, backward), bf16, 3/4 moved.
    gather = next(c for c in work.collectives if c.kind.startswith("all-gather"))
    layer = P._transformer_params(cfg) / cfg.num_layers  # the embeddings spread over the layers
    assert gather.runs == 2 * cfg.num_layers and gather.group == 4 and not gather.in_scan
    assert gather.bytes == pytest.approx(2 * layer * 3 / 4)


def test_hope_state_per_sequence_by_hand():
    config = _hope()
    cfg = config.model
    work = P.workload(config, V5E4)
    d, layers, hidden = cfg.d_model, cfg.num_layers, 192
    cms = 2 * 3 * d * hidden * 4  # two SwiGLU levels of float32 fast weights
    memory = 4 * (2 * 32 * 32) * 4 * 2  # 4 heads x MLP (two 32 x 32) x float32 x (weights, momentum)
    mixer = (4 + 1) * memory  # k, v, eta, alpha and the output memory
    per_token = (
        4 * memory / 8  # small memories' chunk states, one per 8 tokens
        + memory / 16  # the output memory's, one per 16
        + 2 * (7 * 4 * 32 + d)  # saved projection outputs (bf16)
        + 4 * d * 2  # residual stream into each CMS level
        + 4 * cfg.vocab_size / layers  # the segment's softmax
    )
    # No checkpointing (remat none): every segment's inputs and every token's residuals.
    assert work.state_bytes == pytest.approx(layers * (4 * (cms + mixer) + SEQ_LEN * per_token))
    hbm = V5E4.chip.hbm_bytes
    assert work.sequences_allowed(hbm) == int((hbm - work.fixed_bytes) // work.state_bytes)


def test_projection_adds_work_ops_and_exposed_collectives():
    ops = [P.Op("w", 128, 128, 128, 1, 1000, 0.0)]
    inside = P.Collective("all-reduce", 4, 1e6, 100, True)
    outside = P.Collective("all-gather", 4, 1e6, 10, False)
    work = P.Workload("m", {}, 1000, 1, 1, 128, ops, [inside, outside], op_count=5000)
    p = P.project(work, V5E4)
    compute = ops[0].seconds(V5E4)
    assert p.compute_seconds == pytest.approx(compute)
    assert p.op_seconds == pytest.approx(5000 * P.OP_SECONDS)
    hop = 3 * P.HOP_SECONDS + 1e6 / V5E4.chip.ici_bandwidth
    assert p.scan_collective_seconds == pytest.approx(100 * hop)
    assert p.collective_seconds == pytest.approx(100 * hop + max(0.0, 10 * hop - compute))
    assert p.tokens_per_second == pytest.approx(1000 / (compute + 5000 * P.OP_SECONDS + p.collective_seconds))


def test_compiled_collectives_inside_the_scan_are_those_run_every_chunk():
    work = P.workload(_hope("dots_with_no_batch_dims_saveable"), V5E4)  # 4 segments, chunks of 2
    profile = HloProfile(
        ops=12345.0,
        collectives=(
            HloCollective(
                "all-gather",
                4,
                1e3,
                2.0,
            ),  # once per checkpointed chunk
            HloCollective("all-reduce", 4, 1e3, 1.0),  # once per step
        ),
        loops=(),
    )
    compiled = P.with_compiled(work, profile)
    assert compiled.op_count == 12345 and compiled.op_source == "compiled HLO"
    assert [c.in_scan for c in compiled.collectives] == [True, False]


HLO = """HloModule step

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %m = f32[4]{0} multiply(%p, %p)
}

%cond (c: (s32[], f32[4])) -> pred[] {
  %c = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%c), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%inner_cond (c: (s32[], f32[4])) -> pred[] {
  %c = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%c), index=0
  %n = s32[] constant(2)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%inner (b: (s32[], f32[4])) -> (s32[], f32[4]) {
  %b = (s32[], f32[4]) parameter(0)
  %x = f32[4]{0} get-tuple-element(%b), index=1
  %f = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused
  %g = f32[4]{0} fusion(%f), kind=kLoop, calls=%fused
  ROOT %t = (s32[], f32[4]) tuple(%i, %g)
}

%small (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %a = f32[4]{0} add(%x, %x)
}

%big (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %a = f32[4]{0} add(%x, %x)
  %b = f32[4]{0} add(%a, %a)
  ROOT %c = f32[4]{0} add(%b, %b)
}

%body (b: (s32[], f32[4])) -> (s32[], f32[4]) {
  %b = (s32[], f32[4]) parameter(0)
  %x = f32[4]{0} get-tuple-element(%b), index=1
  %ag = (f32[1], bf16[16,256]{1,0}) all-gather-start(%x), replica_groups=mesh['a'=4,'b'=2] {'a'}
  %agd = bf16[16,256]{1,0} all-gather-done(%ag)
  %w = (s32[], f32[4]) while(%b), condition=%inner_cond, body=%inner
  %p = s32[] constant(0)
  %k = f32[4]{0} conditional(%p, %x, %x), branch_computations={%small, %big}
  ROOT %t = (s32[], f32[4]) tuple(%i, %k)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %init = (s32[], f32[4]) tuple(%z, %a)
  %loop = (s32[], f32[4]) while(%init), condition=%cond, body=%body
  %r = f32[4]{0} all-reduce(%a), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%small
  ROOT %out = f32[4]{0} copy(%r)
}
"""


def test_hlo_profile_unrolls_loops_by_their_trip_counts():
    profile = profile_hlo(HLO)
    # inner loop: 2 fusions + 1 compare of its condition (4 instructions, 3 of them bookkeeping);
    # outer body: the all-gather pair (once), the inner loop 2 x 3, the larger branch (3 adds),
    # and its condition's compare; entry: the outer loop 3 x, the all-reduce and the copy.
    inner = 2 + 1
    outer = 1 + 2 * inner + 3 + 1
    assert profile.ops == 3 * outer + 2
    assert sorted(profile.loops) == [(2, 6.0, inner), (3, 3.0, outer)]
    gather, reduce = sorted(profile.collectives, key=lambda c: c.op)
    assert (gather.op, gather.group, gather.runs) == ("all-gather", 4, 3.0)
    assert gather.bytes == pytest.approx(16 * 256 * 2 * 3 / 4)  # the gathered bf16 array, 3/4 received
    assert (reduce.op, reduce.group, reduce.runs) == ("all-reduce", 8, 1.0)
    assert reduce.bytes == pytest.approx(2 * 16 * 7 / 8)
    assert math.isclose(sum(c.runs for c in profile.collectives), 4.0)
