"""What callers may rely on of a registered model (structural: checked with isinstance).

Every model is a `CausalModel`: a causal forward and token-by-token decoding that reproduces it.
A `StatefulModel` also continues from a decode state over many tokens at once, equal to as many
decode steps (the evaluation runner's fast path).

A model whose class attribute `document_boundaries` lists "mask" or "reset" (nl_jax/models/lm.py)
also takes `segment_ids` int32 [B, T] as a keyword of its forward: the document of each token of
packed rows, which attention and (for "reset") recurrent states do not cross. One with
`documents_in_decoding` also decodes packed rows: `init_decode_state(batch_size, max_len,
documents=True)`, then `decode_step(tokens, state, segment_ids=ids [B])` (nl_jax/models/lm.py).
"""

from typing import Any, Protocol, runtime_checkable

import jax


@runtime_checkable
class CausalModel(Protocol):
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens int32 [B, T] -> logits float32 [B, T, V]."""

    def init_decode_state(self, batch_size: int, max_len: int | None = None) -> Any:
        """A fresh decode state; max_len sizes attention caches (recurrent models ignore it)."""

    def decode_step(self, tokens: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        """tokens int32 [B] -> (logits float32 [B, V], new state)."""


@runtime_checkable
class StatefulModel(CausalModel, Protocol):
    def forward_with_state(self, tokens: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        """tokens int32 [B, T] from `state` -> (logits float32 [B, T, V], new state)."""
