"""Named sweeps: each is a function of the base config returning its axes (see grid.py).

    hope_ablation  the paper's HOPE ablation table (Table 6): the full model, then one
                   component off per point (DGD, momentum, weight decay, CMS, adaptive k / v) and
                   adaptive q on
    cms_levels     number of CMS levels (periods x4 apart from the config's first period, up to the
                   sequence length) and, at two levels, the ratio of their periods
    chunk_sizes    the memories' chunk sizes (HOPE: chunk_size x memory_chunk_size; Titans: chunk_size)
    optimizers     AdamW against every deep optimizer of nl_jax.optim (same lr, schedule, decay)

The options read the config (its periods, widths, sequence length), so one sweep fits any size.
"""

from __future__ import annotations

from collections.abc import Callable

from nl_jax.sweep.grid import Option, get_field


def _require(config, sweep: str, *keys: str) -> None:
    missing = []
    for key in keys:
        try:
            get_field(config, key)
        except KeyError:
            missing.append(key)
    if missing:
        name = config.model.get("name", "?")
        raise ValueError(
            f"sweep {sweep!r} sets {', '.join(missing)}, which a {name!r} config does not have "
            f"(it is meant for {'HOPE' if sweep != 'chunk_sizes' else 'HOPE or Titans'} configs)"
        )


def hope_ablation(config) -> list[tuple[Option, ...]]:
    """Rows of the paper's Table 6; the flags are those documented in experiments/configs/hope_base.py."""
    mem = "model.memory."
    _require(config, "hope_ablation", mem + "dgd", "model.cms.signal", mem + "adaptive_q")
    return [
        (
            Option("hope", ()),
            Option("wo_dgd", ((mem + "dgd", False),)),
            Option("wo_momentum", ((mem + "momentum", False),)),
            Option("wo_weight_decay", ((mem + "weight_decay", False),)),
            Option("wo_cms", (("model.cms.signal", "none"),)),
            Option("wo_adaptive_k", ((mem + "adaptive_k", False),)),
            Option("wo_adaptive_v", ((mem + "adaptive_v", False),)),
            Option("adaptive_q", ((mem + "adaptive_q", True),)),
        )
    ]


def _levels(periods: tuple[int, ...], hidden: int, inner_lr: float) -> Option:
    """A CMS with these periods: `periods`, `hidden` and `inner_lr` must have equal lengths."""
    n = len(periods)
    return Option(
        f"levels{n}_" + "-".join(map(str, periods)),
        (
            ("model.cms.periods", tuple(periods)),
            ("model.cms.hidden", (hidden,) * n),
            ("model.cms.inner_lr", (inner_lr,) * n),
        ),
    )


def cms_levels(config) -> list[tuple[Option, ...]]:
    _require(config, "cms_levels", "model.cms.periods", "model.cms.hidden", "model.cms.inner_lr")
    cms = config.model.cms
    p0, hidden, lr = int(cms.periods[0]), int(cms.hidden[0]), float(cms.inner_lr[0])
    seq_len = int(config.data.seq_len)
    by_count = [tuple(p0 * 4**i for i in range(n)) for n in range(1, 5)]
    by_count = [p for p in by_count if p[-1] <= seq_len] or [by_count[0]]
    ratios = [(p0, p0 * r) for r in (2, 16) if p0 * r <= seq_len]  # x4 is in by_count
    return [tuple(_levels(p, hidden, lr) for p in by_count + ratios)]


def _divisors_of(values, *lengths: int) -> list[int]:
    return sorted({int(v) for v in values if v >= 1 and all(n % v == 0 for n in lengths)})


def chunk_sizes(config) -> list[tuple[Option, ...]]:
    seq_len = int(config.data.seq_len)
    model = config.model
    if "memory" in model and "memory_chunk_size" in model.memory:  # HOPE's self-modifying Titans
        c, m = int(model.memory.chunk_size), int(model.memory.memory_chunk_size)
        chunks = _divisors_of((c // 2, c, 2 * c, 4 * c), seq_len)
        memory_chunks = _divisors_of((m, 4 * m), seq_len)
        return [
            tuple(Option(f"chunk={v}", (("model.memory.chunk_size", v),)) for v in chunks),
            tuple(
                Option(f"memory_chunk={v}", (("model.memory.memory_chunk_size", v),)) for v in memory_chunks
            ),
        ]
    if "titans" in model and "memory" in model.titans and "chunk_size" in model.titans.memory:
        c = int(model.titans.memory.chunk_size)
        lengths = [seq_len] + ([int(model.titans.segment_size)] if "segment_size" in model.titans else [])
        chunks = _divisors_of((c // 4, c // 2, c, 2 * c), *lengths)
        return [tuple(Option(f"chunk={v}", (("model.titans.memory.chunk_size", v),)) for v in chunks)]
    _require(config, "chunk_sizes", "model.memory.chunk_size")
    raise AssertionError("unreachable")


def optimizers(config) -> list[tuple[Option, ...]]:
    from nl_jax.optim.factory import OPTIMIZERS

    del config
    return [tuple(Option(name, (("optim.name", name),)) for name in OPTIMIZERS)]


SWEEPS: dict[str, Callable] = {
    "hope_ablation": hope_ablation,
    "cms_levels": cms_levels,
    "chunk_sizes": chunk_sizes,
    "optimizers": optimizers,
}


def named_axes(name: str, config) -> list[tuple[Option, ...]]:
    """The axes of the named sweep `name` for `config`; unknown names list the known ones."""
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; named sweeps: {', '.join(SWEEPS)}")
    return SWEEPS[name](config)
