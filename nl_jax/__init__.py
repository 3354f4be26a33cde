"""nl_jax: Nested Learning (Behrouz et al., 2025) in JAX / Flax NNX.

Subpackages:
  memory.ops  pure associative-memory functions (naive / chunked / recurrent forms)
  optim       deep optimizers as optax transforms
"""

__version__ = "0.1.0"
