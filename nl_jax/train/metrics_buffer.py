"""The train metrics of the steps since the last logged row, read from the device one step late.

Reading a step's metrics waits for that step to finish; holding them until the next step has been
dispatched keeps the device busy meanwhile. A step counts only once it is read, and reading a
non-finite one stops the run (`NonFiniteLossError`, naming the last good checkpoint).
"""

from __future__ import annotations

import math

import jax
import numpy as np

from nl_jax.train.step import NonFiniteLossError


class MetricsBuffer:
    """`push` each step's metrics (device arrays); `flush` before anything that needs every step so
    far read (a row, an eval, a save, the end); `take_row` averages and empties the window."""

    def __init__(self, checkpointer, window: list[dict] = ()):
        self._ckpt = checkpointer
        # Restored from a checkpoint's metadata: a run resumed between two log steps averages the
        # same steps into its next row as an uninterrupted run.
        self.window: list[dict] = [dict(w) for w in window]
        self._pending: tuple[int, dict] | None = None
        self.last_loss: float | None = None

    def push(self, step: int, metrics: dict) -> None:
        """Reads the step held so far, then holds `metrics` of `step` (the step just dispatched)."""
        self.flush()
        self._pending = (step, metrics)

    def flush(self) -> None:
        """Reads the held step, if any, into the window."""
        if self._pending is None:
            return
        step, m = self._pending
        self._pending = None
        m = jax.device_get(m)
        if not bool(m["finite"]):
            raise self._non_finite(step, m)
        self.last_loss = float(m["loss"])
        self.window.append({k: float(v) for k, v in m.items() if k != "finite"})

    def take_row(self) -> dict | None:
        """Mean loss and grad norm of the window, and its last lr; None for an empty window."""
        if not self.window:
            return None
        row = {k: float(np.mean([w[k] for w in self.window])) for k in ("loss", "grad_norm")}
        row["lr"] = self.window[-1]["lr"]
        self.window.clear()
        return row

    def saved_window(self) -> list[dict]:
        """The window as a checkpoint stores it."""
        return [dict(w) for w in self.window]

    def _non_finite(self, step: int, m: dict) -> NonFiniteLossError:
        self._ckpt.wait()
        good = self._ckpt.last_good_step()
        loss, gnorm = float(m["loss"]), float(m["grad_norm"])
        what = (
            f"non-finite loss or gradient (loss {loss}, grad norm {gnorm})"
            if not (math.isfinite(loss) and math.isfinite(gnorm))
            else f"non-finite parameters or optimizer state after the update (loss {loss}, "
            f"grad norm {gnorm}, lr {float(m['lr'])})"
        )
        return NonFiniteLossError(
            f"{what} at step {step}; stopped without saving that state. Last good checkpoint: "
            f"{'step ' + str(good) if good is not None else 'none'} in {self._ckpt.directory}. "
            "Try a lower optim.lr, a longer optim.warmup_steps or optim.clip_norm."
        )
