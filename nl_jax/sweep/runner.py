"""Running a plan: locally in sequence, as printed commands, or through launch/ on TPU slices.

Local points run as subprocesses of `python -m experiments.pretrain`, not in this process: a
crash of one point (an XLA abort, the kernel's OOM killer, a segfault) does not end the sweep, each
point starts with a clean JAX runtime and gives its memory back, and the command that ran is the
one `--mode=print` shows. The cost is a few seconds of start-up per point.

Every point is looked up before it runs: finished (its summary.json reports all its steps, and its
evaluation exists when one is asked for) -> skipped; failed before -> skipped unless
`retry_failed`; otherwise it is (re)started in its own workdir, where the trainer resumes from the
newest checkpoint by itself. Each start, end and failure is an event in status.jsonl, so "each
point trained once" can be checked after the fact, and a failure is recorded and the sweep goes on.

SIGTERM to the sweep is passed to the running point (which saves a checkpoint and stops) and
ends the sweep; Ctrl-C reaches both; if the sweep is killed outright, the point is killed with it
(Linux) so a re-run never shares a workdir with a leftover.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

from nl_jax.sweep import state
from nl_jax.sweep.plan import Plan

SUITES = ("lm", "commonsense", "niah", "continual")


@dataclasses.dataclass
class Outcome:
    """What the runner did with each point: status is finished | failed | interrupted | launched."""

    statuses: dict = dataclasses.field(default_factory=dict)
    interrupted_by: int = 0  # the signal that stopped the sweep, 0 if none

    @property
    def failed(self) -> list[str]:
        return [n for n, s in self.statuses.items() if s == "failed"]


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the sweep process dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def error_line(output: str) -> str:
    """The line that explains a failure: pretrain's "error: ..." line, else the last line naming
    an exception (a traceback's), else the last line with words in it."""
    lines = [ln.strip() for ln in output.splitlines() if re.search(r"[A-Za-z]", ln)]
    for pattern in (r"^error:", r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b"):
        found = [ln for ln in lines if re.search(pattern, ln)]
        if found:
            return found[-1][:500]
    return (lines or [""])[-1][:500]


def _suites(suite: str) -> list[str]:
    names = [s.strip() for s in suite.split(",") if s.strip()]
    return list(SUITES) if "all" in names else names


def evaluated(plan: Plan, name: str, summ: dict | None) -> bool:
    """No evaluation asked for, or the newest results hold every suite, at the final step."""
    if not plan.eval_suite:
        return True
    res = state.eval_results(plan.root, name)
    if not res or not summ:
        return False
    step = res.get("meta", {}).get("step")
    return step == summ.get("final_step") and all(s in res for s in _suites(plan.eval_suite))


def point_status(plan: Plan, name: str, evts: list[dict] | None = None) -> str:
    """finished | failed | incomplete (started, not done) | launched | pending (never started)."""
    summ = state.summary(plan.root, name)
    if state.trained(summ, plan.steps[name]) and evaluated(plan, name, summ):
        return "finished"
    evts = state.events(plan.root) if evts is None else evts
    mine = [e["event"] for e in evts if e.get("point") == name]
    if not mine:
        return "pending"
    return {"failed": "failed", "launched": "launched"}.get(mine[-1], "incomplete")


class _Child:
    """Runs one command, writes its output to a log file and echoes it with a prefix; forwards
    SIGTERM to it."""

    current: subprocess.Popen | None = None
    stop_signal = 0

    @classmethod
    def on_sigterm(cls, signum, frame):
        del frame
        cls.stop_signal = signum
        if cls.current is not None and cls.current.poll() is None:
            cls.current.send_signal(signal.SIGTERM)  # the trainer saves a checkpoint and exits

    @classmethod
    def run(
        cls, cmd: list[str], log_path: str | None, prefix: str, echo: bool, env: dict | None
    ) -> tuple[int, str]:
        """(exit code, error line); `log_path` None: no log file."""
        if log_path:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
        tail: list[str] = []
        with open(log_path or os.devnull, "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            cls.current = proc
            try:
                for line in proc.stdout:
                    log.write(line)
                    tail = (tail + [line])[-200:]
                    if echo:
                        sys.stdout.write(f"{prefix}{line}")
                        sys.stdout.flush()
                rc = proc.wait()
            except KeyboardInterrupt:  # the child got the SIGINT too; let it go, then stop the sweep
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
            finally:
                cls.current = None
        return rc, error_line("".join(tail))


def _start_event(plan: Plan, name: str, evts: list[dict], event: str, cmd: list[str]) -> None:
    attempt = sum(1 for e in evts if e.get("point") == name and e.get("event") == event) + 1
    state.record(plan.root, name, event, attempt=attempt, command=shlex.join(cmd))


def run_local(
    plan: Plan,
    *,
    retry_failed: bool = False,
    echo: bool = True,
    python: str = sys.executable,
    env: dict | None = None,
    log=print,
) -> Outcome:
    """Runs the plan's unfinished points one after the other in this machine."""
    if "://" in plan.root:
        raise ValueError(f"local runs need a local --workdir, not {plan.root!r} (use --mode=launch)")
    state.write_manifest(plan.root, plan.manifest())
    outcome = Outcome()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _Child.on_sigterm)
    _Child.stop_signal = 0
    try:
        for i, point in enumerate(plan.points):
            if _Child.stop_signal:  # SIGTERM between two points
                outcome.interrupted_by = _Child.stop_signal
                break
            name = point.name
            tag = f"[{i + 1}/{len(plan.points)} {name}]"
            evts = state.events(plan.root)
            status = point_status(plan, name, evts)
            if status == "finished":
                log(f"{tag} finished before: skipped")
                outcome.statuses[name] = "finished"
                continue
            if status == "failed" and not retry_failed:
                err = state.last_outcome(evts, name).get("error", "")
                log(f"{tag} failed before ({err}): skipped; --retry_failed runs it again")
                outcome.statuses[name] = "failed"
                continue
            outcome.statuses[name] = _run_point(plan, point, evts, tag, echo, python, env, log)
        if _Child.stop_signal:
            outcome.interrupted_by = _Child.stop_signal
            log(f"stopped by signal {_Child.stop_signal}: re-run the same command to resume")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return outcome


def _run_point(plan, point, evts, tag, echo, python, env, log) -> str:
    name, workdir = point.name, plan.workdir(point)
    log_path = state.join(workdir, "train.log")
    t0 = time.time()
    summ = state.summary(plan.root, name)
    try:
        if not state.trained(summ, plan.steps[name]):
            cmd = [python, *plan.pretrain_args(point)]
            log(f"{tag} training: {shlex.join(cmd)}")
            _start_event(plan, name, evts, "start", cmd)
            rc, err = _Child.run(cmd, log_path, f"{tag} ", echo, env)
            summ = state.summary(plan.root, name)
            if rc != 0 or not state.trained(summ, plan.steps[name]):
                return _ended(
                    plan, name, rc, err or "the run ended without a complete summary.json", t0, log, tag
                )
        if not evaluated(plan, name, summ):
            cmd = [python, *plan.eval_args_for(point)]
            log(f"{tag} evaluating: {shlex.join(cmd)}")
            _start_event(plan, name, evts, "eval", cmd)
            rc, err = _Child.run(cmd, log_path, f"{tag} ", echo, env)
            if rc != 0 or not evaluated(plan, name, summ):
                return _ended(plan, name, rc, f"evaluate: {err}", t0, log, tag)
    except KeyboardInterrupt:
        state.record(
            plan.root, name, "interrupted", error="KeyboardInterrupt", seconds=round(time.time() - t0, 1)
        )
        raise
    state.record(
        plan.root,
        name,
        "finished",
        start_step=summ.get("start_step"),
        final_eval_loss=summ.get("final_eval_loss"),
        seconds=round(time.time() - t0, 1),
    )
    log(f"{tag} finished: validation loss {summ.get('final_eval_loss')} in {time.time() - t0:.0f}s")
    return "finished"


def _ended(plan, name, rc, err, t0, log, tag) -> str:
    interrupted = bool(_Child.stop_signal)
    event = "interrupted" if interrupted else "failed"
    if interrupted:
        err = f"stopped by signal {_Child.stop_signal}; a re-run resumes it from its checkpoint"
    state.record(plan.root, name, event, rc=rc, error=err, seconds=round(time.time() - t0, 1))
    log(f"{tag} {event} (exit code {rc}): {err}")
    return event


def print_commands(plan: Plan, *, python: str = "python") -> list[str]:
    """One shell line per unfinished point (finished ones as comments), in order."""
    evts = state.events(plan.root)
    lines = []
    for point in plan.points:
        if point_status(plan, point.name, evts) == "finished":
            lines.append(f"# finished: {point.name}")
        else:
            lines.append(plan.shell_line(point, python))
    return lines


def _run_name(name: str) -> str:
    """launch/run.sh accepts [A-Za-z0-9_.-] in a run name (it names the log on the workers)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:100]


def launch_commands(plan: Plan, launcher: str) -> list[tuple[str, list[str]]]:
    """(point, argv) for each unfinished point: `launcher` (e.g. "launch/run.sh --name N --zone Z")
    plus `--run-name POINT`, and `--foreground` unless each point has its own slice, then `--` and
    the point's command. `{index}` in `launcher` (e.g. `--name abl-{index}`) gives each point its
    own slice: they run at the same time, detached; otherwise they run in turn on the one slice."""
    parallel = "{index}" in launcher
    evts = state.events(plan.root)
    out = []
    for i, point in enumerate(plan.points):
        if point_status(plan, point.name, evts) == "finished":
            continue
        base = shlex.split(launcher.replace("{index}", str(i)))
        remote = ["python", *plan.pretrain_args(point)]
        if plan.eval_suite:
            remote = ["bash", "-c", plan.shell_line(point)]
        extra = ["--run-name", _run_name(point.name)] + ([] if parallel else ["--foreground"])
        out.append((point.name, [*base, *extra, "--", *remote]))
    return out


def run_launch(
    plan: Plan, launcher: str, *, retry_failed: bool = False, env: dict | None = None, log=print
) -> Outcome:
    """Runs each unfinished point's launch command here (the launch scripts drive gcloud). With the
    scripts' dry-run (`--dry-run` in `launcher`, or DRY_RUN=1) nothing is recorded."""
    if not launcher.strip():
        raise ValueError("--mode=launch needs --launch='launch/run.sh --name TPU --zone ZONE [...]'")
    dry = (
        "--dry-run" in shlex.split(launcher) or (env if env is not None else os.environ).get("DRY_RUN") == "1"
    )
    if not dry:
        state.write_manifest(plan.root, plan.manifest())
    outcome = Outcome()
    evts = state.events(plan.root)
    for name, cmd in launch_commands(plan, launcher):
        if point_status(plan, name, evts) == "failed" and not retry_failed:
            log(f"[{name}] failed before: skipped; --retry_failed runs it again")
            outcome.statuses[name] = "failed"
            continue
        log(f"[{name}] {shlex.join(cmd)}")
        if not dry:
            _start_event(plan, name, evts, "start", cmd)
        rc, err = _Child.run(cmd, None, "", True, env)
        status = "launched" if rc == 0 else "failed"
        if not dry:
            state.record(plan.root, name, status, **({} if rc == 0 else {"rc": rc, "error": err}))
        if rc != 0:
            log(f"[{name}] launch failed (exit code {rc}): {err}")
        outcome.statuses[name] = status
    return outcome
