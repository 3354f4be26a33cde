"""Learning-rate schedules for pretraining: linear warm-up, then cosine, WSD or constant.

All are optax schedules (``step -> lr``, jit-traceable) built from optax's pieces::

    warmup_cosine(peak, warmup, total, final_fraction)     # cosine decay to final_fraction * peak
    wsd(peak, warmup, total, decay_fraction, final_fraction, decay_shape)
                                # warm-up, stable at peak, then a decay over the last decay_fraction
    from_config(optim_cfg, total_steps)                     # by name: cosine | wsd | constant
"""

from __future__ import annotations

import logging

import optax

SCHEDULES = ("cosine", "wsd", "constant")


def _check(peak: float, warmup: int, total: int) -> None:
    if total < 1:
        raise ValueError(f"total_steps must be >= 1, got {total}")
    if not 0 <= warmup <= total:
        raise ValueError(f"warmup_steps={warmup} must be in [0, total_steps={total}]")
    if peak < 0:
        raise ValueError(f"peak learning rate must be >= 0, got {peak}")


def _warmup(peak: float, warmup: int) -> optax.Schedule:
    # Starts at peak / warmup rather than 0, so the first step already moves the weights.
    return optax.linear_schedule(peak / max(warmup, 1), peak, max(warmup - 1, 1))


def warmup_cosine(peak: float, warmup: int, total: int, final_fraction: float = 0.1) -> optax.Schedule:
    """Linear warm-up over `warmup` steps to `peak`, cosine decay to `final_fraction * peak` at `total`."""
    _check(peak, warmup, total)
    cosine = optax.cosine_decay_schedule(peak, max(total - warmup, 1), alpha=final_fraction)
    if warmup == 0:
        return cosine
    return optax.join_schedules([_warmup(peak, warmup), cosine], [warmup])


def wsd(
    peak: float,
    warmup: int,
    total: int,
    decay_fraction: float = 0.2,
    final_fraction: float = 0.0,
    decay_shape: str = "linear",
) -> optax.Schedule:
    """Warmup-Stable-Decay: warm-up, `peak` until the last `decay_fraction` of the steps, then a
    linear (or 'cosine' / 'sqrt') decay to `final_fraction * peak` at `total`."""
    _check(peak, warmup, total)
    if not 0 < decay_fraction <= 1:
        raise ValueError(f"wsd decay_fraction must be in (0, 1], got {decay_fraction}")
    decay_steps = max(1, round(decay_fraction * total))
    stable_end = max(warmup, total - decay_steps)
    end = final_fraction * peak
    if decay_shape == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif decay_shape == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=final_fraction)
    elif decay_shape == "sqrt":

        def decay(step):
            frac = optax.linear_schedule(0.0, 1.0, decay_steps)(step)
            return end + (peak - end) * (1.0 - frac**0.5)

    else:
        raise ValueError(f"unknown wsd decay_shape {decay_shape!r}; choose linear, cosine or sqrt")
    pieces, bounds = [optax.constant_schedule(peak), decay], [stable_end]
    if warmup:
        pieces, bounds = [_warmup(peak, warmup)] + pieces, [warmup] + bounds
    return optax.join_schedules(pieces, bounds)


def from_config(optim_cfg, total_steps: int) -> optax.Schedule:
    """The schedule named by `optim_cfg.schedule` (fields: lr, warmup_steps, final_lr_fraction,
    wsd_decay_fraction, wsd_decay_shape)."""
    name = optim_cfg.schedule
    peak, warmup = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
    if warmup > total_steps:  # a short run (e.g. --config.train.steps=20) of a long config
        logging.warning("optim.warmup_steps=%d > %d steps: warming up over all of them", warmup, total_steps)
        warmup = total_steps
    final = float(optim_cfg.get("final_lr_fraction", 0.1))
    if name == "cosine":
        return warmup_cosine(peak, warmup, total_steps, final)
    if name == "wsd":
        return wsd(
            peak,
            warmup,
            total_steps,
            float(optim_cfg.get("wsd_decay_fraction", 0.2)),
            final,
            optim_cfg.get("wsd_decay_shape", "linear"),
        )
    if name == "constant":
        _check(peak, warmup, total_steps)
        if warmup == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules([_warmup(peak, warmup), optax.constant_schedule(peak)], [warmup])
    raise ValueError(f"unknown optim.schedule {name!r}; choose one of {SCHEDULES}")
