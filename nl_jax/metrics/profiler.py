"""A profiler window by config: trace steps [start, start + num_steps) with jax.profiler.

The trace lands in `<logdir>/plugins/profile/...` (TensorBoard's profile plugin, or xprof, reads
it). Each step inside the window is wrapped in a `StepTraceAnnotation`, so the viewer shows step
boundaries. Only process 0 traces unless `all_processes` is set.
"""

from __future__ import annotations

import contextlib
import logging

import jax


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
