"""The error path every experiments command shares: a failure ends the command with one line on
stderr, `error: <the problem and how to fix it>`, and an exit code for its kind. The traceback is
printed too (above that line) with `--verbosity=1` or the environment variable NL_JAX_TRACEBACK=1.

    from experiments import cli
    ...
    if __name__ == "__main__":
        cli.run(main)          # instead of absl's app.run(main)

Library code raises ordinary exceptions (ValueError for a bad input, OSError from the filesystem,
nl_jax.train's NonFiniteLossError); `classify` maps them to the codes below, and a command raises
`CommandError` for a failure it detects itself. The README's Reliability section lists the codes and
their messages.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import traceback
from typing import NoReturn

from absl import app, flags

from experiments import host_memory

BAD_INPUT = 2  # a flag, config field, path or input file is wrong or missing: fix the command
NON_FINITE = 3  # training stopped on a NaN / inf; the message names the last good checkpoint
FILESYSTEM = 4  # a file or directory cannot be read or written: permissions, read-only, disk full
INTERNAL = 5  # anything else: a bug, or the machine failing (the traceback shows where)
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
PREEMPTED = 143  # SIGTERM; pretrain saved a checkpoint first (128 + SIGTERM)
# 1 is a result, never one of these failures: compile's "does not fit", sweep's "a point failed".


class CommandError(Exception):
    """A failure a command detected itself: its message (problem and fix) and exit code."""

    def __init__(self, message: str, code: int = BAD_INPUT):
        super().__init__(message)
        self.code = code


def _os_message(error: OSError) -> str:
    if (
        error.strerror and error.filename
    ):  # e.g. "[Errno 13] Permission denied: 'x'" -> "x: Permission denied"
        return f"{error.filename}: {error.strerror}"
    return str(error)


def classify(error: BaseException) -> tuple[int, str]:
    """(exit code, message) for an exception raised by a command."""
    if isinstance(error, CommandError):
        return error.code, str(error)
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED, "interrupted"
    if isinstance(error, FloatingPointError):
        return NON_FINITE, str(error)
    if isinstance(error, FileNotFoundError):  # a path the command was given does not exist
        return BAD_INPUT, _os_message(error)
    if isinstance(error, OSError):
        return FILESYSTEM, _os_message(error)
    if isinstance(error, KeyError):  # str() of a KeyError quotes its message
        return BAD_INPUT, str(error.args[0]) if error.args else "KeyError"
    if isinstance(error, (ValueError, app.UsageError, flags.Error)):
        return BAD_INPUT, str(error)
    return INTERNAL, (
        f"{type(error).__name__}: {error} (unexpected; NL_JAX_TRACEBACK=1 prints where it happened)"
    )


def writable_dir(path: str, flag: str) -> str:
    """Creates the directory `path` if it is missing and checks that a file can be written in it;
    a CommandError naming `flag` otherwise. Remote (gs://) paths are left to the library."""
    if "://" in path:
        return path
    if os.path.exists(path) and not os.path.isdir(path):
        raise CommandError(f"{flag}={path} is a file, not a directory: pass a directory", FILESYSTEM)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise CommandError(
            f"{flag}={path} cannot be written ({e.strerror or e}): pass a directory you can write to",
            FILESYSTEM,
        ) from e
    return path


def one_line(message: str) -> str:
    return re.sub(r"\s*\n\s*", " ", message).strip()


def _traceback_wanted() -> bool:
    if os.environ.get("NL_JAX_TRACEBACK", "") not in ("", "0"):
        return True
    if flags.FLAGS.is_parsed():
        return flags.FLAGS["verbosity"].value >= 1
    # A flag error stopped the parsing: read --verbosity / -v from the command line itself.
    for i, arg in enumerate(sys.argv):
        m = re.fullmatch(r"--?(?:verbosity|v)(?:=(-?\d+))?", arg)
        if m:
            value = m.group(1) or (sys.argv[i + 1] if i + 1 < len(sys.argv) else "")
            return value.lstrip("-").isdigit() and int(value) >= 1
    return False


def fail(error: BaseException) -> NoReturn:
    """Prints `error: ...` (after the traceback, when asked for) and exits with the error's code."""
    code, message = classify(error)
    if _traceback_wanted():
        traceback.print_exception(error)
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(main) -> None:
    """absl's `app.run(main)` with this error path around the flag parsing and `main`, in a process
    whose malloc uses transparent huge pages (`host_memory`: it may re-execute the command once)."""
    host_memory.reexec_with_huge_pages()

    def parse_flags(argv):
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # a flag's value, or a config file a flag loads
            fail(e)

    def guarded_main(argv):
        try:
            return main(argv)
        except SystemExit:
            raise
        except BaseException as e:
            fail(e)

    app.run(guarded_main, flags_parser=parse_flags)
