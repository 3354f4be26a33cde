"""Document sources: local text and jsonl files, and TFDS through `tfds.data_source`.

Every source has a stable `repr` built from its arguments only: grain checkpoints and our token cache
compare sources by repr, so it must not change between runs (no object ids, no open handles).

Local files have no split of their own; a document goes to "validation" when
CRC32(its UTF-8 text) / 2**32 < eval_fraction (default 5%), else to "train". Hashing the content
keeps the split stable under file reordering and puts duplicate documents on the same side.
Pass `eval_path` to use separate files for validation instead.

Files must be UTF-8 text: one with a NUL byte or bytes that are not UTF-8 (a binary, another
encoding) is an error naming it, unless `decode_errors="replace"` reads it anyway with U+FFFD for
the bad bytes.
"""

from __future__ import annotations

import glob
import json
import os
import zlib
from collections.abc import Iterator

import numpy as np

TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("validation", "valid", "eval", "test")
DEFAULT_EVAL_FRACTION = 0.05
DECODE_ERRORS = ("strict", "replace")
_READ_ANYWAY = "or read it anyway with decode_errors=replace (data.decode_errors / --decode_errors)"


def read_text(path: str, decode_errors: str = "strict") -> str:
    """The text of a UTF-8 file; with "strict", a ValueError naming a file that is not UTF-8 text."""
    with open(path, "rb") as f:
        data = f.read()
    if decode_errors == "strict":
        nul = data.find(b"\0")
        if nul >= 0:
            raise ValueError(
                f"{path} is not text (a NUL byte at offset {nul}: a binary file?); use text files, {_READ_ANYWAY}"
            )
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); convert it "
                f"to UTF-8, {_READ_ANYWAY}"
            ) from None
    return data.decode("utf-8", errors=decode_errors)


def expand_paths(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """A file, a directory (searched recursively for `suffixes`) or a glob -> sorted file list."""
    if not path:
        raise ValueError("data path is empty: set data.path to a file, directory or glob")
    if os.path.isdir(path):
        files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(suffixes)]
    elif any(c in path for c in "*?["):
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"data path does not exist: {path!r}")
    if not files:
        raise ValueError(f"No input files {suffixes} found for data path {path!r}")
    return sorted(files)


def is_validation_doc(text: str, eval_fraction: float) -> bool:
    return zlib.crc32(text.encode("utf-8")) / 2**32 < eval_fraction


def split_of(text: str, split: str, eval_fraction: float) -> bool:
    """Whether `text` belongs to `split` under the content-hash rule."""
    if split in TRAIN_SPLITS:
        return not is_validation_doc(text, eval_fraction)
    if split in EVAL_SPLITS:
        return is_validation_doc(text, eval_fraction)
    raise ValueError(f"Unknown split {split!r}: use one of {TRAIN_SPLITS + EVAL_SPLITS}")


def read_text_documents(path: str, decode_errors: str = "strict") -> Iterator[str]:
    """Documents of one text file: paragraphs, i.e. runs of text separated by blank lines.

    A single book-sized file therefore still has a validation split. Paragraph text is kept as is
    except its final newline: the line break and blank lines after it become the EOS separator.
    """
    text = read_text(path, decode_errors)
    if not text.strip():
        raise ValueError(f"Empty input file: {path!r} contains no text")
    para: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.strip():
            para.append(line)
        elif para:
            yield "".join(para).rstrip("\r\n")
            para = []
    if para:
        yield "".join(para).rstrip("\r\n")


def read_jsonl_documents(path: str, text_key: str, decode_errors: str = "strict") -> Iterator[str]:
    """One document per line: the string under `text_key` (blank lines skipped)."""
    any_line = False
    with open(path, encoding="utf-8", errors=decode_errors) as f:
        for lineno, line in enumerate(_utf8_lines(f, path), 1):
            if not line.strip():
                continue
            any_line = True
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_key not in record:
                raise ValueError(f"{path}:{lineno}: record has no text key {text_key!r}")
            if not isinstance(record[text_key], str):
                raise ValueError(f"{path}:{lineno}: {text_key!r} is not a string")
            if record[text_key]:
                yield record[text_key]
    if not any_line:
        raise ValueError(f"Empty input file: {path!r} contains no JSON lines")


def _utf8_lines(f, path: str) -> Iterator[str]:
    """The lines of a text-mode file, a decoding error a ValueError naming the file."""
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8, {_READ_ANYWAY}"
        ) from None


class _LocalFiles:
    """Shared split logic for text and jsonl files."""

    suffixes: tuple[str, ...] = ()

    def __init__(
        self,
        path: str,
        eval_path: str = "",
        eval_fraction: float = DEFAULT_EVAL_FRACTION,
        decode_errors: str = "strict",
    ):
        self.path = path
        self.eval_path = eval_path
        self.eval_fraction = float(eval_fraction)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        if decode_errors not in DECODE_ERRORS:
            raise ValueError(f"decode_errors must be one of {DECODE_ERRORS}, got {decode_errors!r}")
        self.decode_errors = decode_errors

    def _repr_decode(self) -> str:
        # Only a non-default value is part of the repr: the reprs of existing runs' sources stay.
        return "" if self.decode_errors == "strict" else f", decode_errors={self.decode_errors!r}"

    def _read(self, path: str) -> Iterator[str]:
        raise NotImplementedError

    def iter_documents(self, split: str) -> Iterator[str]:
        if self.eval_path:  # separate validation files: all of path is train, all of eval_path eval
            path = self.eval_path if split in EVAL_SPLITS else self.path
            split_of(" ", split, 0.0)  # validates the split name
            for f in expand_paths(path, self.suffixes):
                yield from self._read(f)
            return
        for f in expand_paths(self.path, self.suffixes):
            for doc in self._read(f):
                if split_of(doc, split, self.eval_fraction):
                    yield doc

    def documents(self, split: str) -> list[str]:
        docs = [d for d in self.iter_documents(split) if d]
        if not docs:
            where = self.eval_path if (self.eval_path and split in EVAL_SPLITS) else self.path
            raise ValueError(
                f"Empty corpus: split {split!r} of {where!r} has no documents"
                + (
                    ""
                    if self.eval_path
                    else f" (validation takes ~{self.eval_fraction:.0%} of documents by hash; "
                    "for a tiny input set data.eval_path)"
                )
            )
        return docs


class TextFiles(_LocalFiles):
    """Plain text files (`*.txt` when `path` is a directory); documents are paragraphs."""

    suffixes = (".txt",)

    def _read(self, path: str) -> Iterator[str]:
        return read_text_documents(path, self.decode_errors)

    def __repr__(self) -> str:
        return (
            f"TextFiles(path={self.path!r}, eval_path={self.eval_path!r}, eval_fraction={self.eval_fraction}"
            f"{self._repr_decode()})"
        )


class JsonlFiles(_LocalFiles):
    """JSON-lines files (`*.jsonl` when `path` is a directory), one document per line."""

    suffixes = (".jsonl", ".json")

    def __init__(
        self,
        path: str,
        text_key: str = "text",
        eval_path: str = "",
        eval_fraction: float = DEFAULT_EVAL_FRACTION,
        decode_errors: str = "strict",
    ):
        super().__init__(path, eval_path, eval_fraction, decode_errors)
        self.text_key = text_key

    def _read(self, path: str) -> Iterator[str]:
        return read_jsonl_documents(path, self.text_key, self.decode_errors)

    def __repr__(self) -> str:
        return (
            f"JsonlFiles(path={self.path!r}, text_key={self.text_key!r}, "
            f"eval_path={self.eval_path!r}, eval_fraction={self.eval_fraction}{self._repr_decode()})"
        )


class TfdsText:
    """A TFDS dataset read with `tfds.data_source` (ArrayRecord, random access, no TensorFlow).

    The dataset must already be prepared in `data_dir` (no download happens here). Documents are
    streamed and tokenized on the fly by the pipeline, so the corpus never has to fit in memory.
    """

    def __init__(self, name: str, data_dir: str = "", text_key: str = "text"):
        if not name:
            raise ValueError("data.tfds_name is empty: name a prepared TFDS dataset, e.g. 'c4/en:3.1.0'")
        self.name = name
        self.data_dir = data_dir
        self.text_key = text_key

    def data_source(self, split: str):
        import tensorflow_datasets as tfds  # lazy: importing tfds costs ~0.7 s

        try:
            src = tfds.data_source(self.name, split=split, data_dir=self.data_dir or None, download=False)
        except Exception as e:  # tfds raises several types for "not prepared" / "unknown split"
            raise ValueError(
                f"Cannot open TFDS {self.name!r} split {split!r} in data_dir {self.data_dir!r}: {e}"
            ) from e
        if len(src) == 0:
            raise ValueError(f"Empty corpus: TFDS {self.name!r} split {split!r} has no examples")
        return src

    def __repr__(self) -> str:
        return f"TfdsText(name={self.name!r}, data_dir={self.data_dir!r}, text_key={self.text_key!r})"


def record_text(record, text_key: str) -> str:
    """The text of a TFDS record (bytes or str feature)."""
    try:
        value = record[text_key]
    except (KeyError, TypeError):
        raise ValueError(f"TFDS record has no text feature {text_key!r}; set data.text_key") from None
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
