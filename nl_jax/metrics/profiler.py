"""A profiler window by config: trace steps [start, start + num_steps) with jax.profiler; and the
named parts of a model, which a profile splits its time by.

The trace lands in `<logdir>/plugins/profile/...` (TensorBoard's profile plugin, or xprof, reads
it). Each step inside the window is wrapped in a `StepTraceAnnotation`, so the viewer shows step
boundaries. Only process 0 traces unless `all_processes` is set.

`part(name)` is a `jax.named_scope`: the name becomes a component of the op names of everything
traced inside it, in the forward and in its transposes ("transpose(jvp(mixer))"), so each kernel of
the compiled program, and each event of a trace, says which part of the model it runs for
(`benchmarks.step_profile`, "by part").
"""

from __future__ import annotations

import contextlib
import logging
import re

import jax

# A kernel inside several parts counts for the first one listed (the inner backward runs every CMS).
PARTS = (
    "inner_backward",  # HOPE ntp: each segment's next-token gradient wrt the CMS fast weights
    "cms_update",  # HOPE: those gradients into the levels' accumulators, and the boundary steps
    "small_memories",  # self-modifying Titans: the k, v, eta, alpha memories' reads and updates
    "output_memory",  # self-modifying Titans: the output memory
    "mixer",  # a block's token mixer (attention, a memory layer), but for the parts above
    "cms",  # HOPE: the Continuum Memory System's levels
    "mlp",  # a block's feed-forward layer
)


def part(name: str):
    """A named scope for one of `PARTS` (a context manager)."""
    if name not in PARTS:
        raise ValueError(f"unknown model part {name!r}; one of {PARTS}")
    return jax.named_scope(name)


def part_of(op_name: str) -> str:
    """The part of the model an HLO op name ("jit(f)/transpose(jvp(mixer))/...") was traced in: the
    first of `PARTS` that is one of its components, else "other"."""
    components = set(re.split(r"[/()]", op_name))
    return next((p for p in PARTS if p in components), "other")


def in_outer_backward(op_name: str) -> bool:
    """Whether an HLO op name belongs to the outer backward: the transpose of the differentiated
    function itself ("jit(f)/transpose(...)"), not a transpose inside its forward (HOPE's inner
    backward)."""
    return re.match(r"jit\([^)]*\)/transpose", op_name) is not None


class ProfilerWindow:
    """`with window.step(step): ...` around each train step; starts / stops the trace itself."""

    def __init__(self, logdir: str, start: int, num_steps: int, enabled: bool = True):
        self.logdir, self.start, self.stop_at = logdir, start, start + max(num_steps, 0)
        self.enabled = enabled and num_steps > 0
        self.active = False
        self.done = False

    @contextlib.contextmanager
    def step(self, step: int):
        if self.enabled and not self.active and not self.done and self.start <= step < self.stop_at:
            logging.info("profiler: tracing steps %d..%d into %s", step, self.stop_at - 1, self.logdir)
            jax.profiler.start_trace(self.logdir)
            self.active = True
        if self.active:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                yield
        else:
            yield
        if self.active and step + 1 >= self.stop_at:
            self.finish()

    def finish(self) -> None:
        """Stops an open trace (also called when the run ends inside the window)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active, self.done = False, True
            logging.info("profiler: trace written to %s", self.logdir)
