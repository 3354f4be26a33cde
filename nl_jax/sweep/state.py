"""What a sweep keeps on disk, under its root (local or gs://):

    sweep.json          the manifest: base config, base overrides, points (name, overrides)
    status.jsonl        one event per line: start / eval / finished / failed / interrupted / launched,
                        with the time, the command, the exit code and the error line
    <point>/            the point's workdir (the trainer's checkpoints, metrics.jsonl, summary.json)
    <point>/train.log   the point's output (local runs)
    results.md / results.csv / loss_curves.png / <metric>.png   written by results.py

A point has finished training when its summary.json reports all of its steps done (not preempted);
the trainer writes that file only at the end of a run, so its presence cannot mean a half-done run.
"""

from __future__ import annotations

import json
import os
import time

from etils import epath

MANIFEST = "sweep.json"
STATUS = "status.jsonl"


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if "://" in root else os.path.join(root, *parts)


def read_text(path: str) -> str | None:
    if "://" not in path:
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return f.read()
    p = epath.Path(path)
    return p.read_text() if p.exists() else None


def write_text(path: str, text: str) -> None:
    if "://" not in path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # a reader never sees half a file
        return
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def read_json(path: str) -> dict | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def read_jsonl_text(text: str | None) -> list[dict]:
    rows = []
    for line in (text or "").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return rows


def record(root: str, point: str, event: str, **fields) -> dict:
    """Appends one event to status.jsonl and returns it."""
    row = {"time": round(time.time(), 3), "point": point, "event": event, **fields}
    path = join(root, STATUS)
    line = json.dumps(row) + "\n"
    if "://" not in path:
        os.makedirs(root, exist_ok=True)
        with open(path, "a") as f:
            f.write(line)
    else:  # object stores have no append
        write_text(path, (read_text(path) or "") + line)
    return row


def events(root: str) -> list[dict]:
    return read_jsonl_text(read_text(join(root, STATUS)))


def last_outcome(evts: list[dict], point: str) -> dict | None:
    """The point's last finished / failed / interrupted event."""
    ends = [
        e for e in evts if e.get("point") == point and e.get("event") in ("finished", "failed", "interrupted")
    ]
    return ends[-1] if ends else None


def summary(root: str, point: str) -> dict | None:
    return read_json(join(root, point, "summary.json"))


def trained(summ: dict | None, steps: int) -> bool:
    """True when the summary is of a run that completed all `steps`."""
    return bool(
        summ
        and not summ.get("preempted")
        and int(summ.get("total_steps", -1)) == int(steps)
        and int(summ.get("final_step", -1)) >= int(steps)
    )


def eval_results(root: str, point: str) -> dict | None:
    """The newest `<point>/eval/step_<N>/eval_results.json` written by experiments.evaluate."""
    base = join(root, point, "eval")
    if "://" in base:
        p = epath.Path(base)
        names = [c.name for c in p.iterdir()] if p.exists() else []
    else:
        names = os.listdir(base) if os.path.isdir(base) else []
    steps = sorted(int(n[5:]) for n in names if n.startswith("step_") and n[5:].isdigit())
    for step in reversed(steps):
        res = read_json(join(base, f"step_{step}", "eval_results.json"))
        if res is not None:
            return res
    return None


def write_manifest(root: str, manifest: dict) -> None:
    write_text(join(root, MANIFEST), json.dumps(manifest, indent=1) + "\n")


def read_manifest(root: str) -> dict:
    manifest = read_json(join(root, MANIFEST))
    if manifest is None:
        raise FileNotFoundError(f"{join(root, MANIFEST)} not found: is {root!r} the root of a sweep?")
    return manifest
