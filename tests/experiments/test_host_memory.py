"""experiments.host_memory: which environments a command re-executes with, and that it does."""

import os
import subprocess
import sys

from experiments import host_memory

TUNED = f"{host_memory.TUNABLE}=1"


def test_tuned_environment_adds_the_tunable_where_it_applies():
    env = {"PATH": "/bin"}
    assert host_memory.tuned_environment(env, (2, 36), "madvise") == {"PATH": "/bin", "GLIBC_TUNABLES": TUNED}
    assert host_memory.tuned_environment(env, (2, 35), "always")["GLIBC_TUNABLES"] == TUNED
    other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert host_memory.tuned_environment(other, (2, 36), "madvise")["GLIBC_TUNABLES"] == (
        f"glibc.malloc.arena_max=2:{TUNED}"
    )


def test_tuned_environment_leaves_what_it_should_alone():
    assert host_memory.tuned_environment({}, (2, 34), "madvise") is None  # glibc without the tunable
    assert host_memory.tuned_environment({}, None, "madvise") is None  # not glibc
    assert host_memory.tuned_environment({}, (2, 36), "never") is None  # huge pages off
    assert host_memory.tuned_environment({}, (2, 36), None) is None  # no sysfs file
    assert host_memory.tuned_environment({"NL_JAX_HUGE_PAGES": "0"}, (2, 36), "madvise") is None
    chosen = {"GLIBC_TUNABLES": f"{host_memory.TUNABLE}=0"}  # the user's own setting
    assert host_memory.tuned_environment(chosen, (2, 36), "madvise") is None


def test_without_tunable_restores_a_plain_environment():
    assert host_memory.without_tunable({"GLIBC_TUNABLES": TUNED, "A": "1"}) == {"A": "1"}
    kept = host_memory.without_tunable({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNED}"})
    assert kept == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}


def test_a_command_reexecutes_once_with_the_tunable():
    """The real call in a child process: where this machine supports it, the child replaces itself
    by the same command with the tunable (so its code runs twice in one process, printing once per
    run), else it runs once as it was started."""
    code = (
        "import os; from experiments import host_memory; print('run', flush=True); "
        "host_memory.reexec_with_huge_pages(); print('tunables', os.environ.get('GLIBC_TUNABLES'))"
    )
    env = host_memory.without_tunable(os.environ)
    env.pop("NL_JAX_HUGE_PAGES", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    expected = host_memory.tuned_environment(env, host_memory._glibc_version(), host_memory._thp_mode())
    if sys.platform == "linux" and expected is not None:
        assert out.stdout.splitlines() == ["run", "run", f"tunables {expected['GLIBC_TUNABLES']}"]
    else:
        assert out.stdout.splitlines() == ["run", f"tunables {env.get('GLIBC_TUNABLES')}"]
    env["NL_JAX_HUGE_PAGES"] = "0"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert off.stdout.splitlines() == ["run", f"tunables {env.get('GLIBC_TUNABLES')}"]
