"""FLOPs per token (model method or the 6N + attention estimate), MFU, progress line, profiler window."""

import os

import jax.numpy as jnp
import pytest

from experiments import configs
from nl_jax.metrics import (
    ProfilerWindow,
    Throughput,
    estimate_forward_flops_per_token,
    format_duration,
    forward_flops_per_token,
    mfu,
    peak_flops_per_device,
    progress_line,
    train_flops_per_token,
)
from nl_jax.models import count_params, get_model_class


def test_transformer_estimate_by_hand():
    cfg = configs.load("transformer_tiny").model  # d 128, 4 layers, 4 heads, vocab 260, untied
    n = count_params(cfg)
    seq = 256
    dense = n - 260 * 128  # the input embedding is a lookup, not a matmul
    attention = 4 * 4.0 * (seq / 2) * 128  # layers x (QK^T + AV: 2 x 2 FLOPs) x avg keys x width
    assert estimate_forward_flops_per_token(cfg, seq, n) == pytest.approx(2 * dense + attention)
    fwd, source = forward_flops_per_token(get_model_class("transformer"), cfg, seq, n)
    train, train_source = train_flops_per_token(get_model_class("transformer"), cfg, seq, n)
    assert train == pytest.approx(3 * fwd) and train_source == f"3 x {source}"
    assert "estimate" in source or "forward_flops_per_token" in source


def test_a_model_method_overrides_the_estimate():
    class WithInnerLoops:
        @staticmethod
        def forward_flops_per_token(model_cfg, seq_len):
            return 123.0 * seq_len

    fwd, source = forward_flops_per_token(WithInnerLoops, configs.load("transformer_tiny").model, 10, 1)
    assert fwd == 1230.0 and source == "WithInnerLoops.forward_flops_per_token"


def test_peak_table_and_mfu():
    assert peak_flops_per_device("TPU v5p") == 459e12
    assert peak_flops_per_device("TPU v5 lite") == 197e12
    assert peak_flops_per_device("cpu") == 130e9
    assert peak_flops_per_device("Mystery Accelerator 9000") is None
    assert peak_flops_per_device("Mystery Accelerator 9000", override=1e12) == 1e12
    assert mfu(1000.0, 1e9, 4, 1e12) == pytest.approx(0.25)
    assert mfu(1000.0, 1e9, 4, None) is None


def test_progress_line_and_throughput():
    line = progress_line(
        120,
        600,
        {"loss": 2.31404, "grad_norm": 0.41, "lr": 1e-3, "tokens_per_s": 12345, "mfu": 0.031, "eta_s": 133},
    )
    assert (
        line
        == "step 120/600 (20%) | loss 2.3140 | gnorm 0.41 | lr 1.00e-03 | 12.3k tok/s | MFU 3.10% | ETA 2m13s"
    )
    assert format_duration(3725) == "1h02m05s" and format_duration(5) == "5s"
    t = Throughput(total_steps=10, tokens_per_step=100)
    assert t.report(1) == {}
    t.start(1)
    r = t.report(3)
    assert r["tokens_per_s"] > 0 and r["eta_s"] >= 0


def test_profiler_window_traces_only_its_steps(tmp_path):
    window = ProfilerWindow(str(tmp_path), start=2, num_steps=2)
    for step in range(6):
        with window.step(step):
            jnp.ones(4).sum().block_until_ready()
        assert window.active == (step == 2)
    assert window.done
    assert any(f for _, _, f in os.walk(tmp_path))
    off = ProfilerWindow(str(tmp_path / "off"), start=0, num_steps=0)
    with off.step(0):
        pass
    assert not os.path.exists(tmp_path / "off")
