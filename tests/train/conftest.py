import jax
import pytest


@pytest.fixture(autouse=True, scope="package")
def fast_compiles():
    """Trainer tests compile many small programs: skip most XLA optimisations (about half the
    CPU time), and restore the setting for the rest of the session."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
