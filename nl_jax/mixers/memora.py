"""Memora's memory layer (Miras, arXiv 2504.13173): the Titans memory layer (`titans.NeuralMemory`:
projections, short convs, gates, output norm and gate) with the KL-retention update of
`nl_jax.memory.ops.memora` in place of Titans' momentum and weight decay:

    W_t = c Softmax_rows(alpha_t log W_{t-1} - theta_t grad l2(W; k_t, v_t))
    theta_t = max_lr * sigmoid(x W_theta),  alpha_t = 1 - sigmoid(x W_alpha)    (as Titans' gates)

Every row of every fast-weight matrix stays on the probability simplex scaled by c (`scale`). The
meta-learned initial memory is a set of logits (`memory_init_*`, Params) whose row softmax times c is
the first state; they start
random (N(0, 1)), because uniform rows would give every hidden unit of the MLP memory the same
update forever.
"""

from __future__ import annotations

import jax

from nl_jax.memory.ops import memora
from nl_jax.mixers.titans import NeuralMemory


class MemoraMemory(NeuralMemory):
    """`NeuralMemory` with Memora's update; same arguments but `momentum` (none) plus `scale` (c)."""

    def __init__(self, *args, scale: float = 1.0, **kwargs):
        if not scale > 0:
            raise ValueError(f"memora's simplex scale c must be > 0, got {scale!r}")
        if kwargs.get("read", "post_update") != "post_update":
            read = kwargs["read"]
            raise ValueError(f"memora reads after each token's update (read='post_update'), got {read!r}")
        if kwargs.get("impl", "xla") != "xla":
            raise ValueError(f"memora runs its own chunked form (impl='xla'), got impl={kwargs['impl']!r}")
        self.scale = float(scale)
        super().__init__(*args, momentum=False, objective="l2", **kwargs)

    @staticmethod
    def _memory_inits(dh: int, hid: int) -> dict:
        logits = jax.nn.initializers.normal(1.0)
        return {"w": (logits, (dh, dh)), "w1": (logits, (dh, hid)), "w2": (logits, (hid, dh))}

    def _initial_memory(self, batch_size: int) -> memora.MemoraState:
        return memora.init_state(self._initial_weights(batch_size), self.scale)

    def _naive(self, q, k, v, rates, memory: memora.MemoraState):
        return memora.memora_naive(
            self.spec, memory, q, k, v, rates, chunk_size=self.chunk_size, scale=self.scale
        )

    def _chunked(self, q, k, v, rates, memory: memora.MemoraState, **restart):
        kw = dict(chunk_size=self.chunk_size, scale=self.scale, remat=self.remat_chunks)
        return memora.memora_chunked(self.spec, memory, q, k, v, rates, **kw, **restart)

    def _step(self, memory: memora.MemoraState, q, k, v, rates):
        return memora.memora_recurrent(
            self.spec, memory, q, k, v, rates, chunk_size=self.chunk_size, scale=self.scale
        )
