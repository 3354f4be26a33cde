"""Test setup: CPU only, 8 fake devices, float32 matmuls at full precision.

The environment must be set before jax is imported anywhere, which is why it lives here.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Ahead-of-time TPU compilation loads libtpu in each pytest worker: allow more than one process,
# and skip the metadata-server lookup of a real TPU VM.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Tests compile hundreds of small programs and run each a few times: XLA's CPU optimisation passes
# cost more than they save here (about a fifth of the suite's time). Results stay float32-exact.
jax.config.update("jax_disable_most_optimizations", True)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Every compiled XLA:CPU program holds a few memory mappings of its own for as long as jax's
    caches keep it. A pytest worker that kept all the programs of half the suite came within a few
    hundred of the kernel's limit (vm.max_map_count, 65,530 by default), and one that passed it
    crashed inside XLA's compiler. Modules share no programs, so each module's are dropped after it."""
    yield
    jax.clear_caches()
