"""A command's host memory: glibc's malloc backed by transparent huge pages.

XLA on the CPU allocates a step's large buffers (a scan's saved residuals, activations) afresh every
step, and glibc serves allocations of that size from new mappings, so every 4 KiB page of them
faults on first touch: 224k page faults and 0.45 s of kernel time per hope_tiny step (8 x 256),
17k per Transformer++ step at the peers' shape. With the glibc tunable `glibc.malloc.hugetlb=1`
(glibc 2.35 and later) malloc asks for transparent huge pages on its mappings, 2 MiB per fault, and
those faults all but vanish (README, "HOPE training speed"). Tunables are read when a process
starts, so a command re-executes itself once, at its start, with the tunable added to
GLIBC_TUNABLES. Set NL_JAX_HUGE_PAGES=0 to keep glibc's defaults; a GLIBC_TUNABLES that already
names the tunable is left as it is.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, ...] | None:
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    return tuple(int(x) for x in version.split(".")[:2]) if name == "glibc" else None


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (the bracketed word of its sysfs file), or None."""
    try:
        with open(_THP_MODE) as f:
            words = f.read().split()
    except OSError:
        return None
    return next((w[1:-1] for w in words if w.startswith("[")), None)


def tuned_environment(environ, glibc: tuple[int, ...] | None, thp: str | None) -> dict | None:
    """The environment to re-execute with, or None when there is nothing to change: glibc too old
    or absent, huge pages off in the kernel, the tunable already set, or NL_JAX_HUGE_PAGES=0."""
    current = environ.get("GLIBC_TUNABLES", "")
    if (
        environ.get("NL_JAX_HUGE_PAGES") == "0"
        or TUNABLE in current
        or glibc is None
        or glibc < (2, 35)
        or thp not in ("always", "madvise")
    ):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [current, f"{TUNABLE}=1"]))}


def without_tunable(environ) -> dict:
    """`environ` without the tunable (a child process then starts as a plain one would)."""
    kept = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith(TUNABLE)]
    env = {k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}
    return {**env, "GLIBC_TUNABLES": ":".join(kept)} if kept else env


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command with the tunable set, where it applies (Linux with
    glibc >= 2.35 and transparent huge pages on); otherwise return. Call it first thing in a
    command's `__main__`: what ran before is run again."""
    if platform.system() != "Linux":
        return
    env = tuned_environment(os.environ, _glibc_version(), _thp_mode())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
