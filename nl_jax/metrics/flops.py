"""Training FLOPs per token and model FLOPs utilisation (MFU).

FLOPs are counted analytically, never from `compiled.cost_analysis()`: XLA counts the body of a
`lax.scan` once, so scanned layers and the inner (fast-weight) loops of memory models would be
undercounted. A model class may define `forward_flops_per_token(model_cfg, seq_len)` with its own
count (inner loops included); otherwise the estimate is the standard one for a Transformer:
2 FLOPs per matmul parameter (everything but the embedding lookup) plus causal attention,
2 * num_layers * seq_len * (q/k width) for QK^T and AV averaged over positions. Training costs
3x the forward (backward = 2x forward) unless the model counts its own step
(`train_flops_per_token`: HOPE's inner objectives run forward only); rematerialisation is not
counted (it is overhead, not model FLOPs). tests/metrics/test_flops_xla.py holds the analytic
counts against XLA's own count of the same step with every scan unrolled.

Peak FLOP/s per device: dense bf16 numbers from the vendors' spec sheets; for CPUs the measured
float32 matmul rate of this project's reference machine (see README), which is a fair stand-in
for any AVX2 host. An unknown device gives MFU = None with a warning, never a guess;
`train.peak_flops_per_device` overrides the table.
"""

from __future__ import annotations

import logging

from nl_jax.parallel.topology import CHIPS

# device_kind substring (lower case) -> TPU generation of nl_jax.parallel.topology's chip table
_TPU_KINDS = {
    "tpu v4": "v4",
    "tpu v5 lite": "v5e",
    "tpu v5e": "v5e",
    "tpu v5p": "v5p",
    "tpu v5": "v5p",  # v5p reports "TPU v5"
    "tpu v6 lite": "v6e",
    "tpu v6e": "v6e",
}
PEAK_FLOPS = {
    # device_kind substring (lower case) -> peak dense bf16 FLOP/s per jax device
    **{kind: CHIPS[gen].peak_bf16_flops for kind, gen in _TPU_KINDS.items()},
    "tpu7x": 2307e12,
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "cpu": 130e9,  # measured f32 jnp.dot on a 2-core AVX2 host, for the whole process
}


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device of `device_kind`, `override` if > 0, None if unknown."""
    if override and override > 0:
        return float(override)
    kind = device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # most specific first
        if key in kind:
            return PEAK_FLOPS[key]
    logging.warning(
        "unknown device kind %r: MFU is not reported (set train.peak_flops_per_device)", device_kind
    )
    return None


def _dense_params(model_cfg, param_count: int) -> int:
    """Parameters used in matmuls: all of them minus the input embedding (a lookup), unless the
    embedding is tied (then it is the output projection too)."""
    if model_cfg.get("tie_embeddings", False):
        return param_count
    return param_count - model_cfg.get("vocab_size", 0) * model_cfg.get("d_model", 0)


def estimate_forward_flops_per_token(model_cfg, seq_len: int, param_count: int) -> float:
    """2 * dense params + causal attention (2 * L * T * d_qk), for models without their own count."""
    flops = 2.0 * _dense_params(model_cfg, param_count)
    heads = model_cfg.get("num_heads", 0)
    if heads:
        head_dim = model_cfg.get("head_dim", 0) or model_cfg.get("d_model", 0) // heads
        window = model_cfg.get("sliding_window", 0) or seq_len
        # QK^T and AV: 2 matmuls x 2 FLOPs x (average keys seen: ~min(window, T/2)) x width
        keys = min(window, seq_len / 2)
        flops += model_cfg.get("num_layers", 0) * 4.0 * keys * heads * head_dim
    return flops


def forward_flops_per_token(model_cls, model_cfg, seq_len: int, param_count: int) -> tuple[float, str]:
    """(forward FLOPs per token, where the number came from)."""
    fn = getattr(model_cls, "forward_flops_per_token", None)
    if fn is not None:
        return float(fn(model_cfg, seq_len)), f"{model_cls.__name__}.forward_flops_per_token"
    return estimate_forward_flops_per_token(model_cfg, seq_len, param_count), "6N + attention estimate"


def train_flops_per_token(model_cls, model_cfg, seq_len: int, param_count: int) -> tuple[float, str]:
    """(FLOPs per token of a training step, where the number came from): the model's own
    `train_flops_per_token(model_cfg, seq_len)` (models whose forward holds work the backward does
    not differentiate, e.g. an inner objective), else 3x the forward (backward = 2x forward)."""
    fn = getattr(model_cls, "train_flops_per_token", None)
    if fn is not None:
        return float(fn(model_cfg, seq_len)), f"{model_cls.__name__}.train_flops_per_token"
    fwd, source = forward_flops_per_token(model_cls, model_cfg, seq_len, param_count)
    return 3.0 * fwd, f"3 x {source}"


def mfu(tokens_per_second: float, train_flops_per_tok: float, num_devices: int, peak: float | None):
    """Achieved model FLOP/s over the peak of all devices; None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_second * train_flops_per_tok / (num_devices * peak)
