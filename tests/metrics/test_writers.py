"""TensorBoard event files (framing, CRCs, protos) and JSON lines."""

import os
import struct

import pytest

from nl_jax.metrics import MetricWriter, TensorBoardWriter, plot_loss_curve, read_events, read_jsonl
from nl_jax.metrics.writers import crc32c, encode_event, frame_record


def test_crc32c_known_vectors():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


def test_event_encoding_matches_the_protobuf_wire_format():
    # Event{wall_time=1.5, step=300, summary{value{tag="a", simple_value=2.0}}} by hand:
    by_hand = (
        b"\x09"
        + struct.pack("<d", 1.5)
        + b"\x10"
        + bytes([0xAC, 0x02])  # varint 300
        + b"\x2a\x0a"
        + b"\x0a\x08"
        + b"\x0a\x01a"
        + b"\x15"
        + struct.pack("<f", 2.0)
    )
    assert encode_event(300, 1.5, {"a": 2.0}) == by_hand
    framed = frame_record(b"xyz")
    assert framed[:8] == struct.pack("<Q", 3) and framed[12:15] == b"xyz" and len(framed) == 19


def test_tensorboard_writer_round_trip(tmp_path):
    w = TensorBoardWriter(str(tmp_path))
    for step in (1, 2, 1000):
        w.write_scalars(step, {"loss": 1.0 / step, "lr": 3e-4})
    w.close()
    events = read_events(w.path)
    assert events[0]["scalars"] == {}  # the file_version header event
    assert [e["step"] for e in events[1:]] == [1, 2, 1000]
    assert events[-1]["scalars"]["loss"] == pytest.approx(1e-3)
    data = bytearray(open(w.path, "rb").read())
    data[-6] ^= 0xFF  # a flipped byte is caught by the CRC
    open(w.path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="bad data CRC"):
        read_events(w.path)


def test_metric_writer_jsonl_tensorboard_and_png(tmp_path):
    w = MetricWriter(str(tmp_path))
    for step in range(0, 50, 10):
        w.write(step, "train", {"loss": 5.0 - step / 10, "mfu": 0.1})
    w.write(40, "eval", {"loss": 1.5})
    w.close()
    rows = read_jsonl(w.jsonl_path)
    assert [(r["split"], r["step"]) for r in rows][-2:] == [("train", 40), ("eval", 40)]
    assert sorted(os.listdir(tmp_path / "tensorboard")) == ["eval", "train"]
    png = plot_loss_curve(rows, str(tmp_path / "curve.png"), "t")
    assert open(png, "rb").read(4) == b"\x89PNG"
    assert plot_loss_curve([], str(tmp_path / "none.png")) is None


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricWriter(str(tmp_path / "x"), enabled=False)
    w.write(1, "train", {"loss": 1.0})
    w.close()
    assert not os.path.exists(tmp_path / "x" / "metrics.jsonl")


def test_rows_are_on_disk_as_soon_as_they_are_written(tmp_path):
    w = MetricWriter(str(tmp_path))
    w.write(2, "train", {"loss": 1.0})
    # Read before close, as after a SIGKILL: the row and its TensorBoard event are there.
    assert [r["step"] for r in read_jsonl(w.jsonl_path)] == [2]
    (name,) = os.listdir(tmp_path / "tensorboard" / "train")
    events = read_events(str(tmp_path / "tensorboard" / "train" / name))
    assert [e["scalars"] for e in events if e["scalars"]] == [{"loss": 1.0}]
    w.close()


def test_a_resumed_writer_supersedes_the_rows_it_logs_again(tmp_path):
    w = MetricWriter(str(tmp_path))
    for step in (0, 2, 4, 6):
        w.write(step, "train", {"loss": float(step)})
        if step == 4:
            w.write(4, "eval", {"loss": 0.5})
    w.close()
    with open(w.jsonl_path, "a") as f:
        f.write('{"step": 8, "split": "tr')  # a write cut short by a kill
    assert [r["step"] for r in read_jsonl(w.jsonl_path)] == [0, 2, 4, 4, 6]

    resumed = MetricWriter(str(tmp_path), resume_step=4)  # restored from checkpoint 4
    assert [(r["split"], r["step"]) for r in read_jsonl(w.jsonl_path)] == [
        ("train", 0),
        ("train", 2),
        ("train", 4),
        ("eval", 4),
    ]
    resumed.write(6, "train", {"loss": 6.5})
    resumed.close()
    assert [r["loss"] for r in read_jsonl(w.jsonl_path)][-1] == 6.5
    moved = open(tmp_path / "metrics_superseded.jsonl").read().splitlines()
    assert [line[:30] for line in moved] == ['{"step": 6, "split": "train", ', '{"step": 8, "split": "tr']
    # TensorBoard drops the older events from the step of a session START on.
    tb = tmp_path / "tensorboard" / "train"
    events = [e for name in os.listdir(tb) for e in read_events(str(tb / name))]
    assert [e["step"] for e in events if e["session_start"]] == [0, 5]

    # A complete last row that only lacks its newline is kept, and the next row starts a new line.
    with open(w.jsonl_path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        f.truncate()
    again = MetricWriter(str(tmp_path), resume_step=6)
    again.write(8, "train", {"loss": 8.0})
    again.close()
    assert [r["step"] for r in read_jsonl(w.jsonl_path)] == [0, 2, 4, 4, 6, 8]


def test_a_fresh_writer_supersedes_every_older_row(tmp_path):
    w = MetricWriter(str(tmp_path))
    w.write(0, "eval", {"loss": 5.0})
    w.close()
    MetricWriter(str(tmp_path), resume_step=0).close()
    assert read_jsonl(w.jsonl_path) == []
    assert len(read_jsonl(str(tmp_path / "metrics_superseded.jsonl"))) == 1
