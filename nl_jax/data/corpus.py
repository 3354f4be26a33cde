"""The embedded default corpus: Python standard library source of the running interpreter.

Why this text: it is real, varied natural-language-plus-code text that exists wherever Python runs,
so `hope_tiny` trains with no download and no flags. Selection is deterministic for a given Python
installation: every `*.py` under the stdlib directory (tests, site-packages, caches and vendored
data excluded), ordered by a CRC32 of the relative path (a fixed pseudo-random order that spreads the
sample over the whole library rather than taking packages alphabetically), taken until
`max_bytes` (default 4 MB). Files go to "validation" when CRC32("split:" + relpath) % 20 == 0
(about 5% of files), otherwise to "train", so the two splits never share a file.

Size on CPython 3.11.7 (default cap): 252 files, 3.89 MB = 3.89M byte-level tokens (train: 236
files, 3.64M tokens; validation: 16 files, 0.25M tokens; ~1.05M / 0.07M tokens with an 8k
SentencePiece model). `python -m nl_jax.data.corpus` prints the numbers for the running interpreter.
"""

from __future__ import annotations

import functools
import os
import sysconfig
import zlib

DEFAULT_MAX_BYTES = 4_000_000
MAX_FILE_BYTES = 200_000  # a few huge generated files (e.g. unicode tables) would dominate the sample
VALIDATION_MODULUS = 20
_EXCLUDED_DIRS = {
    "site-packages",
    "dist-packages",
    "__pycache__",
    "test",
    "tests",
    "idle_test",
    "lib2to3",
    "ensurepip",
    "turtledemo",
}


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _crc(s: str) -> int:
    return zlib.crc32(s.encode("utf-8"))


def is_validation_file(relpath: str) -> bool:
    return _crc("split:" + relpath) % VALIDATION_MODULUS == 0


@functools.lru_cache(maxsize=8)
def list_files(root: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[str, ...]:
    """Relative paths of the selected files, in corpus order."""
    root = root or stdlib_dir()
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith(("test", "."))
        )
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            full = os.path.join(dirpath, name)
            size = os.path.getsize(full)
            if 0 < size <= MAX_FILE_BYTES:
                candidates.append((_crc(os.path.relpath(full, root)), os.path.relpath(full, root), size))
    if not candidates:
        raise ValueError(
            f"Embedded corpus is empty: no Python source files found under the stdlib directory "
            f"{root!r} (a zipped or source-less Python?). Use data.source='text' with a local path."
        )
    selected, total = [], 0
    for _, rel, size in sorted(candidates):
        if total + size > max_bytes and selected:
            break
        selected.append(rel)
        total += size
    return tuple(selected)


class EmbeddedCorpus:
    """Document source over the stdlib files: one document per file."""

    def __init__(self, root: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = os.path.abspath(root or stdlib_dir())
        self.max_bytes = int(max_bytes)

    def files(self, split: str) -> list[str]:
        rels = list_files(self.root, self.max_bytes)
        if split == "train":
            return [r for r in rels if not is_validation_file(r)]
        if split in ("validation", "valid", "eval", "test"):
            return [r for r in rels if is_validation_file(r)]
        raise ValueError(f"Unknown split {split!r} for the embedded corpus (use 'train' or 'validation')")

    def documents(self, split: str) -> list[str]:
        docs = []
        for rel in self.files(split):
            with open(os.path.join(self.root, rel), encoding="utf-8", errors="replace") as f:
                docs.append(f.read())
        if not any(docs):
            raise ValueError(f"Embedded corpus split {split!r} under {self.root!r} is empty")
        return docs

    def __repr__(self) -> str:
        return f"EmbeddedCorpus(root={self.root!r}, max_bytes={self.max_bytes})"


def describe(max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Sizes of the embedded corpus on this interpreter (bytes == byte-level tokens, before EOS)."""
    corpus = EmbeddedCorpus(max_bytes=max_bytes)
    out = {"root": corpus.root}
    for split in ("train", "validation"):
        docs = corpus.documents(split)
        out[split] = {"files": len(docs), "bytes": sum(len(d.encode("utf-8")) for d in docs)}
    return out


if __name__ == "__main__":
    print(describe())
