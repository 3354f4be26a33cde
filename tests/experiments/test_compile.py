"""Ahead-of-time compilation of the real train step for a TPU slice (libtpu topology, no TPU)."""

import dataclasses
import math
import pickle

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
    assert report.roofline_seconds == pytest.approx(analytic / report.slice.chip.peak_bf16_flops)


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
    payload, in_tree, out_tree = pickle.loads(save.read_bytes())
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


def test_roofline_counts_the_recompute_and_the_table_row(tiny_v5e):
    config, report, _ = tiny_v5e
    assert report.recompute_flops_per_device == 0 and report.mfu_bound == 1  # remat_policy none
    remat = dataclasses.replace(report, recompute_flops_per_device=report.model_flops_per_device / 3)
    assert remat.mfu_bound == pytest.approx(0.75)
    assert remat.roofline_seconds == pytest.approx(report.roofline_seconds * 4 / 3)
    row = report.markdown_row("transformer_tiny")
    assert row.count("|") == MARKDOWN_HEADER.splitlines()[0].count("|")
    assert "| fsdp4 |" in row and "| yes |" in row and "| 100% |" in row

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
