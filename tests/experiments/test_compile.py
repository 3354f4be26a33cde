"""Ahead-of-time compilation of the real train step for a TPU slice (libtpu topology, no TPU)."""

import dataclasses
import math
import os
import pickle
import subprocess
import sys

import jax
import pytest

from experiments import configs
from nl_jax.metrics.flops import forward_flops_per_token
from nl_jax.models.registry import get_model_class
from nl_jax.parallel.topology import parse_slice
from nl_jax.train.aot import (
    MARKDOWN_HEADER,
    _bytes_in_message,
    compile_for_slice,
    count_collectives,
    mesh_for_slice,
    profile_hlo,
    recompute_flops_per_token,
)
from nl_jax.train.program import build_train_program

GLOBAL_BATCH, SEQ_LEN = 8, 64


def _tiny_config():
    config = configs.load("transformer_tiny")
    # Unrolled layers: XLA's cost_analysis counts a scan body once, so it would see one layer.
    config.model.scan_layers = False
    config.data.global_batch_size = GLOBAL_BATCH
    config.data.seq_len = SEQ_LEN
    return config


def _tiled_shard_bytes(x, fmt) -> int:
    """Bytes of one device's shard of `x` in the TPU layout XLA chose (dims ordered major to minor,
    the minor dims rounded up to the layout's tile; a scalar is stored as a one-element vector)."""
    shard = x.sharding.shard_shape(x.shape)
    dims = [shard[d] for d in fmt.layout.major_to_minor] or [1]
    tile = fmt.layout.tiling[0] if fmt.layout.tiling else ()
    for i in range(1, min(len(tile), len(dims)) + 1):
        dims[-i] = -(-dims[-i] // tile[-i]) * tile[-i]
    return x.dtype.itemsize * math.prod(dims)


@pytest.fixture(scope="module")
def tiny_v5e(tmp_path_factory):
    config = _tiny_config()
    save = tmp_path_factory.mktemp("aot") / "step.pkl"
    report = compile_for_slice(config, "v5e-4", save_path=str(save))
    return config, report, save


def test_argument_bytes_are_the_sharded_state_and_batch(tiny_v5e):
    config, report, _ = tiny_v5e
    slice_ = parse_slice("v5e-4")
    program = build_train_program(config, mesh_for_slice(config.mesh, slice_))
    leaves = jax.tree.leaves(program.abstract_state) + jax.tree.leaves(program.abstract_batch)
    formats = jax.tree.leaves(report.compiled.input_formats)
    assert len(formats) == len(leaves)
    # The default mesh is pure FSDP over the 4 chips: every matrix is split 4 ways.
    assert report.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1}
    dense = sum(x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape)) for x in leaves)
    unsharded = sum(x.dtype.itemsize * math.prod(x.shape) for x in leaves)
    assert dense < unsharded / 3  # shards, not replicas
    hand = sum(_tiled_shard_bytes(x, f) for x, f in zip(leaves, formats))
    assert report.argument_bytes == hand
    # The whole state is donated: every state output reuses its input buffer.
    batch_bytes = sum(_tiled_shard_bytes(x, f) for x, f in zip(leaves[-1:], formats[-1:]))
    assert report.alias_bytes == hand - batch_bytes
    assert report.total_bytes < report.slice.chip.hbm_bytes and report.fits
    assert "FITS" in report.format() and "v5e-4" in report.format()


def test_xla_flops_match_the_analytic_train_flops(tiny_v5e):
    config, report, _ = tiny_v5e
    model_cls = get_model_class(config.model.name)
    fwd, _ = forward_flops_per_token(model_cls, config.model, SEQ_LEN, report.param_count)
    analytic = 3 * fwd * GLOBAL_BATCH * SEQ_LEN / 4
    assert report.model_flops_per_device == pytest.approx(analytic)
    assert report.xla_flops_per_device == pytest.approx(analytic, rel=0.15)
    # The projection prices the same FLOPs (less the RMSNorm scales the estimate counts as weights).
    assert sum(op.flops for op in report.projection.workload.ops) == pytest.approx(analytic, rel=0.01)


def test_collectives_are_counted_and_the_executable_is_saved(tiny_v5e):
    _, report, save = tiny_v5e
    # FSDP gathers the weights: at least one all-gather per sharded weight use.
    assert report.collectives is not None and report.collectives["all-gather"] > 0
    assert count_collectives("%a = f32[4] all-gather-start(x)\n%b = f32[4] all-reduce(y)") == {
        "all-gather": 1,
        "reduce-scatter": 0,
        "all-reduce": 1,
        "all-to-all": 0,
        "collective-permute": 0,
    }
    # The projection takes them from the HLO too, with their group (the 4 FSDP devices) and runs;
    # a Transformer++ has no segment scan, so none of them is inside one.
    work = report.projection.workload
    gathers = [c for c in work.collectives if c.kind == "all-gather"]
    assert sum(c.runs for c in gathers) == report.collectives["all-gather"]  # layers unrolled: once each
    assert all(c.group == 4 and c.bytes > 0 and not c.in_scan for c in gathers)
    payload, in_tree, _ = pickle.loads(save.read_bytes())
    assert len(payload) > 1000 and in_tree.num_leaves == len(jax.tree.leaves(report.compiled.input_formats))


def test_mesh_not_matching_the_slice_is_a_clear_error():
    config = _tiny_config()
    config.mesh.ici_fsdp_parallelism = 8  # v5e-4 has 4 chips
    with pytest.raises(ValueError, match=r"config.mesh does not match slice v5e-4 \(4 devices\).*8"):
        compile_for_slice(config, "v5e-4")
    with pytest.raises(ValueError, match="unknown TPU slice"):
        compile_for_slice(_tiny_config(), "v9-8")


def test_out_of_memory_is_reported_as_does_not_fit(tiny_v5e):
    _, report, _ = tiny_v5e
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
        "(1.26T) exceeds available HBM (95.74G)."
    )
    assert _bytes_in_message(message) == int(1.26 * 1024**4)
    oom = dataclasses.replace(
        report, temp_bytes=_bytes_in_message(message), compiled=None, oom_message=message
    )
    assert not oom.fits and "DOES NOT FIT" in oom.format() and "1.26T" in oom.format()
    # Even a small total is no fit when XLA refused to compile it.
    assert not dataclasses.replace(report, oom_message=message).fits


def test_weights_are_fully_sharded_on_the_default_mesh(tiny_v5e):
    _, report, _ = tiny_v5e
    # Only the norms' scales (a few hundred floats of ~0.9M) are replicated over the 4 FSDP devices.
    assert 0 <= report.weight_excess < 0.02


def test_projection_counts_the_compiled_ops_and_the_table_row(tiny_v5e):
    config, report, _ = tiny_v5e
    work, p = report.projection.workload, report.projection
    # Every matmul is at least one kernel of the compiled step, which has more (norms, softmax, ...).
    assert work.op_source == "compiled HLO" and work.op_count > sum(op.runs for op in work.ops)
    assert p.step_seconds == pytest.approx(p.compute_seconds + p.op_seconds + p.collective_seconds)
    assert "projection      per device of v5e-4" in report.format()
    row = report.markdown_row("transformer_tiny", p)
    assert row.count("|") == MARKDOWN_HEADER.splitlines()[0].count("|")
    assert "| fsdp4 |" in row and "| yes |" in row and row.endswith("| 100.0% |")
    assert report.sequences_that_fit >= work.sequences

    # The recompute each remat setting implies (analytic, no compile).
    cls = get_model_class("transformer")
    config.model.remat_policy = "full"
    assert recompute_flops_per_token(cls, config.model, SEQ_LEN, 123.0) == (123.0, "full")
    hope = configs.load("hope_760m").model  # ntp: the training forward is checkpointed in chunks
    hope_cls = get_model_class("hope")
    fwd = hope_cls.forward_flops_per_token(hope, 4096)
    flops, words = recompute_flops_per_token(hope_cls, hope, 4096, fwd)
    assert words == f"{hope.remat_policy}, ntp checkpoint every 16 segments" and flops == pytest.approx(fwd)
    hope.remat_policy = "none"  # no checkpointing, nothing recomputed
    assert recompute_flops_per_token(hope_cls, hope, 4096, fwd) == (0.0, "none")


@pytest.fixture(scope="module")
def hope_v5e():
    """hope_tiny with the ntp signal: 2 layers, scanned as the sized configs scan them, 4 segments of
    16 tokens, 2 sequences per device."""
    config = configs.load("hope_tiny")
    config.model.update(num_layers=2, scan_layers=True)
    config.model.cms.update(periods=(16, 64), signal="ntp")
    config.data.update(global_batch_size=GLOBAL_BATCH, seq_len=SEQ_LEN)
    return compile_for_slice(config, "v5e-4")


def test_hope_projection_reads_the_segment_scan_from_the_hlo(hope_v5e):
    report = hope_v5e
    work = report.projection.workload
    assert (work.segments, work.segment, work.sequences, work.scan_iterations) == (4, 16, 2, 4)
    # The scan's loops: 4 segments, 2 layers inside each, the memories' chunk loops inside those.
    profile = profile_hlo(report.compiled.as_text())
    assert {4, 2} <= {trip for trip, _, _ in profile.loops}
    assert work.op_count == profile.ops > sum(op.runs for op in work.ops)
    # FSDP over the 4 chips gathers the layer weights inside the scan, every segment.
    inside = [c for c in work.collectives if c.in_scan]
    assert inside and all(c.runs >= work.scan_iterations for c in inside)
    text = report.format()
    assert "segment scan  4 segments of 16 tokens x 1 microbatch(es)" in text
    assert "collectives   per segment:" in text and "compiled HLO" in text


@pytest.mark.e2e
def test_analytic_projection_names_the_transformer_of_the_same_size():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.compile",
            "--config=hope_760m",
            "--topology=v5p-64",
            "--analytic",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "segment scan  256 segments of 16 tokens x 16 microbatch(es) = 4,096 sequential iterations" in out
    assert "16 rows per weight matmul (MXU 128: 12% of its rows)" in out
    assert "vs            transformer_760m (analytic projection, not compiled)" in out
    assert "estimate: 5.7 kernels per matmul, as in compiled HOPE steps" in out  # reads alone (S = 16 in 64)


KERNEL_SWITCHES = [
    ("gated_deltanet_tiny", {"memory_impl": "pallas"}),
    ("titans_tiny", {"titans.memory.impl": "pallas", "titans.memory.structure": "linear"}),  # momentum
    ("titans_tiny", {"titans.memory.impl": "pallas"}),  # the MLP memory
    ("transformer_tiny", {"attention_impl": "splash"}),
]


@pytest.mark.parametrize("name,switches", KERNEL_SWITCHES)
def test_pallas_kernels_compile_with_mosaic_for_a_tpu_slice(name, switches):
    """The memory kernels and splash attention in a sharded train step: each lowers to Mosaic (not
    interpret mode, though the host is a CPU) inside a shard_map, and the step compiles for v5e-4."""
    config = configs.load(name)
    config.model.num_layers = 1
    for path, value in switches.items():
        *parents, leaf = path.split(".")
        section = config.model
        for p in parents:
            section = section[p]
        section[leaf] = value
    config.data.update(global_batch_size=GLOBAL_BATCH, seq_len=128)
    mesh = mesh_for_slice(config.mesh, parse_slice("v5e-4"))
    program = build_train_program(config, mesh)
    with jax.set_mesh(mesh):
        lowered = program.jit_train.lower(program.abstract_state, program.abstract_batch)
        text = lowered.as_text()
        assert "tpu_custom_call" in text and "interpret" not in text.lower()
        assert lowered.compile().memory_analysis() is not None
