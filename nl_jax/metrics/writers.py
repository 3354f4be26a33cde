"""Metric writers: TensorBoard event files and JSON lines, written by process 0 only.

The TensorBoard writer emits the event-file format directly (TFRecord framing around `Event`
protos with scalar `Summary` values: a few varints, no TensorFlow / tensorboard dependency), so
`tensorboard --logdir WORKDIR` reads the runs. `read_events` parses the same files back (tests,
plotting). JSON lines (`metrics.jsonl`) hold one object per logged step, the easiest format for
scripts: `{"step": 100, "split": "train", "loss": 2.31, ...}`.

Every row is flushed as it is written, so a killed run loses no row it logged. A run resumed from
step S redoes the steps after S: `MetricWriter(..., resume_step=S)` moves the rows past S to
`metrics_superseded.jsonl` (nothing is deleted) and starts its TensorBoard files with a
SessionLog START at S + 1, which makes TensorBoard drop the older events from that step on.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping

# ---- CRC32C (Castagnoli), as TFRecord framing needs it ----
_POLY = 0x82F63B78
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---- protobuf wire format (only what Event / Summary need) ----
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint((number << 3) | wire)
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def _scalar_value(tag: str, value: float) -> bytes:
    # Summary.Value: tag = 1 (string), simple_value = 2 (float)
    return _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value))


_SESSION_START = 1  # SessionLog.status START


def encode_event(
    step: int,
    wall_time: float,
    scalars: Mapping[str, float] | None = None,
    file_version: str = "",
    session_start: bool = False,
) -> bytes:
    """An `Event` proto: wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5,
    session_log = 6 (SessionLog: status = 1)."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version:
        out += _field(3, 2, file_version.encode())
    if scalars:
        summary = b"".join(_field(1, 2, _scalar_value(k, float(v))) for k, v in scalars.items())
        out += _field(5, 2, summary)
    if session_start:
        out += _field(6, 2, _field(1, 0, _varint(_SESSION_START)))
    return out


def frame_record(data: bytes) -> bytes:
    """TFRecord framing: length, masked crc of the length, data, masked crc of the data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


class TensorBoardWriter:
    """Scalars to `<logdir>/events.out.tfevents.<time>.<host>` (one file per writer).

    `purge_step`: start with a SessionLog START at that step; TensorBoard then discards the events
    of earlier files at steps >= purge_step (a resumed run's redone steps)."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._f.write(frame_record(encode_event(0, time.time(), file_version="brain.Event:2")))
        if purge_step is not None:
            self._f.write(frame_record(encode_event(purge_step, time.time(), session_start=True)))
        self._f.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        finite = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float))}
        if finite:
            self._f.write(frame_record(encode_event(step, time.time(), finite)))
            self._f.flush()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = n = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_events(path: str) -> list[dict]:
    """Parses an event file (checking every CRC) into [{"step", "wall_time", "scalars",
    "session_start"}]."""
    data = open(path, "rb").read()
    events, i = [], 0
    while i < len(data):
        header = data[i : i + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[i + 8 : i + 12])[0] != _masked_crc(header):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        body = data[i + 12 : i + 12 + length]
        if struct.unpack("<I", data[i + 12 + length : i + 16 + length])[0] != _masked_crc(body):
            raise ValueError(f"{path}: bad data CRC at byte {i}")
        i += 16 + length
        event = {"step": 0, "wall_time": 0.0, "scalars": {}, "session_start": False}
        for number, _, value in _fields(body):
            if number == 1:
                event["wall_time"] = struct.unpack("<d", value)[0]
            elif number == 2:
                event["step"] = value
            elif number == 5:
                for _, _, v in _fields(value):
                    tag, val = "", 0.0
                    for n2, _, x in _fields(v):
                        if n2 == 1:
                            tag = x.decode()
                        elif n2 == 2:
                            val = struct.unpack("<f", x)[0]
                    event["scalars"][tag] = val
            elif number == 6:
                event["session_start"] = any(n == 1 and v == _SESSION_START for n, _, v in _fields(value))
        events.append(event)
    return events


class JsonlWriter:
    """One JSON object per line: {"step": s, "split": ..., **scalars}."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._f = open(path, "a")

    def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        row = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        row.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in scalars.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file; a last line without its newline that does not parse (a write
    cut short by a kill) is left out."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break
            raise
    return rows


def supersede_rows(path: str, first_step: int) -> int:
    """Moves the rows of `path` at steps >= `first_step`, and a last line cut short by a kill, to
    `<stem>_superseded.jsonl` beside it; returns how many lines moved. The moved lines are appended
    there before `path` is atomically replaced, so a kill in between loses nothing."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        text = f.read()
    keep, moved = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a torn last line: every row is written whole, then flushed
            moved.append(line)
            continue
        (moved if row.get("step", 0) >= first_step else keep).append(line)
    if not moved and (not text or text.endswith("\n")):
        return 0
    if moved:
        stem, ext = os.path.splitext(path)
        with open(f"{stem}_superseded{ext}", "a") as f:
            f.write("".join(line + "\n" for line in moved))
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return len(moved)


class MetricWriter:
    """Both writers under one directory (TensorBoard runs `train/` and `eval/`, plus metrics.jsonl);
    a no-op on processes other than 0.

    `resume_step`: the step the run starts from (0: a fresh run). The rows of later steps, which this
    run logs again, are moved out of metrics.jsonl (a fresh run moves them all)."""

    def __init__(self, logdir: str, enabled: bool = True, resume_step: int = 0):
        self.logdir, self.enabled = logdir, enabled
        self.jsonl_path = os.path.join(logdir, "metrics.jsonl")
        self._first_step = resume_step + 1 if resume_step > 0 else 0
        self._tb: dict[str, TensorBoardWriter] = {}
        self._jsonl = None
        if enabled:
            supersede_rows(self.jsonl_path, self._first_step)
            self._jsonl = JsonlWriter(self.jsonl_path)

    def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        if split not in self._tb:
            self._tb[split] = TensorBoardWriter(
                os.path.join(self.logdir, "tensorboard", split), purge_step=self._first_step
            )
        self._tb[split].write_scalars(step, scalars)
        self._jsonl.write(step, split, scalars)

    def flush(self) -> None:
        for w in list(self._tb.values()) + ([self._jsonl] if self._jsonl else []):
            w.flush()

    def close(self) -> None:
        for w in list(self._tb.values()) + ([self._jsonl] if self._jsonl else []):
            w.close()
