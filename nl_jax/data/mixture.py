"""Weighted mixtures of sources (`data.mixture`): e.g. a web-text shard directory and a long-document
one, read in a fixed proportion.

Training (pipeline.make_train_iterator): each component's windows are shuffled with their own seed
and repeated, then grain's `MapDataset.mix` interleaves them deterministically in proportion to the
weights (grain scales the smallest weight to 100 and rounds the others down to integers). The mixed
window stream is indexed like a single source's, so batches, the split across processes and the
iterator state (`{"next_index": k}`) are those of one source, and a resumed run continues on exactly
the batches an uninterrupted run sees.

Validation: every window of every component's validation split is scored once, the components
interleaved in proportion to their weights, so the first `eval.max_batches` batches sample them as
training does.

Components must be random-access sources (embedded, text, jsonl, array_record): a streamed TFDS
dataset joins a mixture as jsonl files or as the array_record shards experiments.prepare_data writes
from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Sources and their (positive) weights; the repr is built from the sources' stable reprs."""

    sources: tuple
    weights: tuple[float, ...]

    def __post_init__(self):
        if len(self.sources) != len(self.weights) or not self.sources:
            raise ValueError(
                f"a mixture needs one weight per source, got {len(self.sources)} sources and "
                f"{len(self.weights)} weights"
            )
        bad = [w for w in self.weights if not w > 0]
        if bad:
            raise ValueError(f"mixture weights must be > 0, got {list(self.weights)}")

    def __repr__(self) -> str:
        parts = ", ".join(f"{w!r}: {s!r}" for s, w in zip(self.sources, self.weights))
        return f"Mixture({parts})"


def not_mixable(source) -> ValueError:
    """The error for a streaming source in a mixture."""
    return ValueError(
        f"data.mixture takes random-access sources (embedded, text, jsonl, array_record), not {source}: "
        "use the dataset as jsonl files, or as array_record shards written from them by "
        "`python -m experiments.prepare_data`"
    )


def interleave(iterators: Sequence[Iterator], weights: Sequence[float]) -> Iterator:
    """Every item of every iterator once, each next item taken from the iterator furthest behind its
    share of the weights (ties: the first); an exhausted iterator drops out. Deterministic."""
    taken = [0] * len(iterators)
    active = list(range(len(iterators)))
    while active:
        i = min(active, key=lambda j: (taken[j] / weights[j], j))
        try:
            item = next(iterators[i])
        except StopIteration:
            active.remove(i)
            continue
        taken[i] += 1
        yield item
