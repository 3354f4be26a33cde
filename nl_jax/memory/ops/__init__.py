"""Associative-memory ops: pure functions, no parameters.

One mechanism (structure x objective x update rule, see `structures` and `update_rule`), three forms with
one contract, `f(spec, state, q, k, v, rates, ...) -> (y, state)`:

  memory_naive      token by token with `lax.scan` and `jax.grad`: the readable reference
  memory_chunked    the training path: `lax.scan` over chunks, batched matmuls inside (impl="xla"),
                    or Pallas kernels (impl="pallas", `pallas_chunked`: linear and MLP memories)
  memory_stream     the same closed forms (`closed_form`) from any position, any length (segments, prefill)
  memory_recurrent  one decode step with a carried state (`memory_recurrent_scan`: over a sequence)

`presets` expresses DeltaNet, the gated delta rule, RWKV-7's generalised delta rule (vector gates,
`vector_chunked`), linear attention / retention, deep linear attention (DLA), TTT, Titans and the
self-modifying update through this one core. `memora` holds Memora's KL-retention update, which is
not linear in the state: its own three forms, built on the core's chunk closed form.
"""

from nl_jax.memory.ops.chunked import IMPLS, memory_chunked, memory_stream
from nl_jax.memory.ops.naive import memory_naive
from nl_jax.memory.ops.update_rule import READ_MODES, Rates, memory_recurrent, memory_recurrent_scan
from nl_jax.memory.ops.structures import (
    InnerNorm,
    LinearBiasWeights,
    LinearWeights,
    MemorySpec,
    MemoryState,
    MLPBiasWeights,
    MLPWeights,
    apply,
    init_state,
    init_weights,
)

__all__ = [
    "IMPLS",
    "READ_MODES",
    "InnerNorm",
    "LinearBiasWeights",
    "LinearWeights",
    "MLPBiasWeights",
    "MLPWeights",
    "MemorySpec",
    "MemoryState",
    "Rates",
    "apply",
    "init_state",
    "init_weights",
    "memory_chunked",
    "memory_naive",
    "memory_recurrent",
    "memory_recurrent_scan",
    "memory_stream",
]
