"""Titans neural long-term memory (LMM) as an NNX layer, thin over `nl_jax.memory.ops`.

    q, k, v = SiLU(conv(x W_q)), SiLU(conv(x W_k)), SiLU(conv(x W_v))     per head; q, k l2-normalised
    theta_t = max_lr * sigmoid(x W_theta)      inner learning rate
    alpha_t = sigmoid(x W_alpha)               forget gate (retention 1 - alpha)
    eta_t   = sigmoid(x W_eta)                 surprise (momentum) decay
    S_t = eta_t S_{t-1} - theta_t grad l(M_B; k_t, v_t),   M_t = (1 - alpha_t) M_{t-1} + S_t
    y = W_o (RMSNorm(M_t(q_t)) * SiLU(x W_g))

(Titans, Section 3; output norm and gate as in Titans, Section 4.4). With `objective="dot"` and no
momentum the same layer is deep linear attention, `presets.deep_linear_attention`:
M_t = (1 - alpha_t) M_{t-1} - theta_t d(-<M_B(k_t), v_t>)/dM. The fast weights are not Params: only
their meta-learned initial value (`memory_init_*`) is, together with the projections and gates. A
training forward starts every sequence from `memory_init` (docs/design.md, Decision 8); with a decode
state the layer continues from that state token by token.

`form` picks the op that runs a training forward: `chunked` (the fast path) or `naive` (the
token-by-token reference with the same chunk semantics), so a whole model can be checked against its
reference by building it twice. `impl` picks the chunked form's implementation (`ops.memory_chunked`:
`xla`, or `pallas`, the Pallas kernels). `forward(x, state)` runs that op from a
carried state (segment by segment, as Titans MAC updates its memory).

Packed rows: with segment ids the training forward restarts the memory from `memory_init` at each
document's first token (which must start a chunk: the caller checks) and the short convs stop at
the boundary, so a packed row equals its documents run apart.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers.conv import ShortConv, document_starts
from nl_jax.layers.linear import Linear, logical_param, to_dtype
from nl_jax.layers.norms import RMSNorm
from nl_jax.memory import ops
from nl_jax.memory.ops import presets
from nl_jax.mixers.front_end import conv_silu, gated_output, l2_normalize

FORMS = ("chunked", "naive")  # the training path, and its token-by-token reference


class NeuralMemoryState(NamedTuple):
    """Decode state of one layer: conv tails of q/k/v and the memory's fast state."""

    conv: tuple[jax.Array, jax.Array, jax.Array]
    memory: ops.MemoryState


class NeuralMemory(nnx.Module):
    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        *,
        structure: str = "mlp",
        hidden: int = 0,
        activation: str = "silu",
        chunk_size: int = 64,
        read: str = "post_update",
        momentum: bool = True,
        objective: str = "l2",
        max_lr: float = 0.1,
        conv_width: int = 4,
        remat_chunks: bool = False,
        form: str = "chunked",
        impl: str = "xla",
        init_std: float = 0.02,
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        if form not in FORMS:
            raise ValueError(f"memory form must be one of {FORMS}, got {form!r}")
        if impl not in ops.IMPLS:
            raise ValueError(f"memory impl must be one of {ops.IMPLS}, got {impl!r}")
        self.impl = impl
        self.spec = ops.MemorySpec(structure, objective, activation)
        self.form = form
        self.num_heads, self.head_dim, self.chunk_size, self.read = num_heads, head_dim, chunk_size, read
        self.momentum, self.max_lr, self.remat_chunks = momentum, max_lr, remat_chunks
        self.dtype = to_dtype(dtype)
        h, dh = num_heads, head_dim
        lin = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = (
            Linear((d_model,), (h, dh), ("embed",), ("heads", "head_dim"), **lin) for _ in range(3)
        )
        conv = dict(width=conv_width, channel_name="heads", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_conv, self.k_conv, self.v_conv = (ShortConv(h * dh, **conv) for _ in range(3))
        gate = lambda: Linear((d_model,), (h,), ("embed",), ("heads",), **lin)  # noqa: E731
        self.lr_proj, self.forget_proj = gate(), gate()
        if momentum:
            self.momentum_proj = gate()
        self.gate_proj = Linear((d_model,), (h, dh), ("embed",), ("heads", "head_dim"), **lin)
        self.out_proj = Linear((h, dh), (d_model,), ("heads", "head_dim"), ("embed",), **lin)
        self.out_norm = RMSNorm(dh, names=("head_dim",), param_dtype=param_dtype)
        names = ("heads", "memory_out", "memory_in")
        inits = self._memory_inits(dh, hidden or dh)
        self.weight_names = ops.LinearWeights._fields if structure == "linear" else ops.MLPWeights._fields
        for name in self.weight_names:  # one Param per fast-weight matrix: memory_init_w, memory_init_w1, ...
            init, shape = inits[name]
            setattr(self, f"memory_init_{name}", logical_param(rngs, init, (h, *shape), names, param_dtype))

    @staticmethod
    def _memory_inits(dh: int, hid: int) -> dict:
        """Initialiser and per-head shape of each meta-learned initial fast-weight matrix.

        A matrix memory starts empty (as linear attention does). The MLP starts as the identity map:
        W1 = 0, W2 ~ N(0, 1/dh), so the first inner gradients reach W1 at once and W2 as soon as W1
        moves."""
        return {
            "w": (jax.nn.initializers.zeros, (dh, dh)),
            "w1": (jax.nn.initializers.zeros, (dh, hid)),
            "w2": (jax.nn.initializers.normal(dh**-0.5), (hid, dh)),
        }

    def _initial_weights(self, batch_size: int):
        """The meta-learned initial matrices, one copy per batch row, in float32."""
        cls = ops.LinearWeights if self.spec.structure == "linear" else ops.MLPWeights
        weights = {}
        for name in self.weight_names:
            p = getattr(self, f"memory_init_{name}")[...].astype(jnp.float32)
            weights[name] = jnp.broadcast_to(p, (batch_size, *p.shape))
        return cls(**weights)

    def _initial_memory(self, batch_size: int) -> ops.MemoryState:
        # Fast weights accumulate in float32 whatever the compute dtype (docs/design.md, Decision 10).
        return ops.init_state(self._initial_weights(batch_size), momentum=self.momentum)

    def init_state(self, batch_size: int) -> NeuralMemoryState:
        convs = tuple(c.init_state(batch_size) for c in (self.q_conv, self.k_conv, self.v_conv))
        return NeuralMemoryState(convs, self._initial_memory(batch_size))

    def _qkv_rates(self, x, conv_states, segment_ids=None):
        projections, convs = (self.q_proj, self.k_proj, self.v_proj), (self.q_conv, self.k_conv, self.v_conv)
        outs, new_convs = conv_silu(projections, convs, x, conv_states, segment_ids)
        q, k, v = (z.astype(jnp.float32) for z in outs)
        gate = lambda proj: jax.nn.sigmoid(proj(x).astype(jnp.float32))  # noqa: E731
        lr, forget = self.max_lr * gate(self.lr_proj), gate(self.forget_proj)
        surprise = gate(self.momentum_proj) if self.momentum else None
        if self.spec.objective == "dot":  # deep linear attention (momentum, if any, joins the rates)
            rates = presets.deep_linear_attention(lr, 1.0 - forget).rates._replace(momentum=surprise)
        else:
            rates = presets.titans(lr, forget, surprise).rates
        return l2_normalize(q), l2_normalize(k), v, rates, new_convs

    def _output(self, x, y):
        return gated_output(x, y, self.out_norm, self.gate_proj, self.out_proj, dtype=self.dtype)

    def forward(
        self, x: jax.Array, state: NeuralMemoryState, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, NeuralMemoryState]:
        """Training path from a carried state: x [B, T, D] -> (y [B, T, D], state after x).

        With the chunked form the state must sit at a chunk boundary and T be a multiple of the
        chunk size (a ValueError otherwise); the naive form takes any state and length.
        `segment_ids` [B, T] (chunked form): restart at each document's first token (module docstring).
        """
        q, k, v, rates, convs = self._qkv_rates(x, state.conv, segment_ids)
        y, memory = self._run(q, k, v, rates, state.memory, segment_ids)
        return self._output(x, y), NeuralMemoryState(convs, memory)

    def _run(self, q, k, v, rates, memory: ops.MemoryState, segment_ids=None):
        """The op of `form` over q, k, v [B, T, H, D] from `memory` -> (y [B, T, H, D], memory)."""
        if self.form == "naive":
            if segment_ids is not None:
                raise ValueError("segment ids (document restarts) need the chunked memory form")
            return self._naive(q, k, v, rates, memory)
        restart = {}
        if segment_ids is not None:
            restart = dict(restart=document_starts(segment_ids), initial=self._initial_memory(q.shape[0]))
        return self._chunked(q, k, v, rates, memory, **restart)

    def _naive(self, q, k, v, rates, memory):
        return ops.memory_naive(self.spec, memory, q, k, v, rates, chunk_size=self.chunk_size, read=self.read)

    def _chunked(self, q, k, v, rates, memory, **restart):
        """`restart`: the flags and initial state of `ops.memory_chunked`'s document restarts."""
        kw = dict(chunk_size=self.chunk_size, read=self.read, remat=self.remat_chunks, impl=self.impl)
        return ops.memory_chunked(self.spec, memory, q, k, v, rates, **kw, **restart)

    def _step(self, memory: ops.MemoryState, q, k, v, rates):
        """One decode step: q, k, v [B, H, D], rates [B, H] -> (y [B, H, D], memory)."""
        return ops.memory_recurrent(
            self.spec, memory, q, k, v, rates, chunk_size=self.chunk_size, read=self.read
        )

    def __call__(self, x: jax.Array, state: NeuralMemoryState | None = None, segment_ids=None):
        """x [B, T, D] -> (y [B, T, D], new state). Without a state: a training forward, state None
        (`segment_ids`: see `forward`)."""
        if state is None:
            return self.forward(x, self.init_state(x.shape[0]), segment_ids)[0], None
        if segment_ids is not None:
            raise ValueError("segment ids are taken by the training forward only (no state)")
        q, k, v, rates, convs = self._qkv_rates(x, state.conv)

        def step(mem, inputs):  # any number of tokens from any position: the decode step, scanned
            y, mem = self._step(mem, *inputs)
            return mem, y

        time_major = jax.tree.map(lambda z: jnp.moveaxis(z, 1, 0), (q, k, v, rates))
        memory, ys = jax.lax.scan(step, state.memory, time_major)
        return self._output(x, jnp.moveaxis(ys, 0, 1)), NeuralMemoryState(convs, memory)
