"""Self-modifying Titans (Eq. 83-91 of the paper) as an NNX layer, thin over `nl_jax.memory.ops`.

Per head (H heads of width dh), B(t) being the state at the last chunk boundary before token t:

    z_q, z_k, z_v = SiLU(conv(x W_q)), SiLU(conv(x W_k)), SiLU(conv(x W_v))      z_eta, z_alpha = x W_eta, x W_alpha
    k_t = l2(M_k,B(t)(z_k,t))      v_t = M_v,B(t)(z_v,t)      q_t = l2(z_q,t)  (adaptive_q: l2(M_q,B(t)(z_q,t)))
    eta_t   = max_lr * sigmoid(<r_eta, M_eta,B(t)(z_eta,t)> + b_eta)             inner learning rate
        (normalize_values=True: v_t = l2(M_v,B(t)(z_v,t)); eta_param="paper": eta_t = softplus(<...> + b_eta);
         memory_inputs="shared": z_q = z_k = z_v = z_eta = z_alpha = SiLU(conv(x W_in)))
    alpha_t = sigmoid(<r_alpha, M_alpha,B(t)(z_alpha,t)> + b_alpha)               retention (weight decay)
    beta_t  = sigmoid(x W_beta)                                                   momentum decay
    every memory M (k, v, q, eta, alpha and the output memory) learns from (k_t, v_hat_t), v_hat_t = M_B(t)(v_t):
        S_t = beta_t S_{t-1} - eta_t grad L(M_B(t); k_t, v_hat_t),   L = 1/2 ||M(k) - v_hat||^2
        M_t = alpha_t M_{t-1} - eta_t (M_{t-1} k_t) k_t^T + S_t      (the DGD term on the input-side weight)
    y_t = M_out,B(t)(q_t)  (read="boundary", the paper's Eq. 90)  or  M_out,t-1(q_t)  (read="per_token")
    out = W_o (RMSNorm(y_t) * SiLU(x W_g))      (per-head norm and gate, as the Titans layer)

Every memory is per head either a residual MLP M(z) = z + W1 s(W2 z) (`structure="mlp"`) or a
matrix (`"linear"`), with a meta-learned initial state (the `init_*` Params of `memory_<name>`); the
fast weights themselves are float32 arrays carried in the state, never Params (docs/design.md,
Decisions 4 and 10).

Chunking (docs/design.md, Decision 6): the k, v, q, eta and alpha memories use `chunk_size`, the
output memory `memory_chunk_size`. Keys, values, rates and self-generated targets of a chunk come
from the states at the end of the previous chunk. Since nothing reads the output memory except the
output, the layer runs in two stages: a scan over `chunk_size` chunks for the small memories (which
feed each other), then the output memory over the keys, values and rates they produced.

Departures from the paper's literal form, each a constructor option (docs/design.md, Decision 11;
the measurements that motivated them are under "stability" below):
  - eta is bounded, max_lr * sigmoid(.) (the paper's eta_t = M_eta(x_t) has no cap): `eta_param`,
    "bounded" (default) or "paper" = softplus(.) (the paper gives no output nonlinearity and a
    learning rate must be positive; max_lr is then unused);
  - each token's inner gradient is clipped to `max_grad_norm` (default 1.0; 0: off, the paper's form);
  - (off by default) each small memory reads its own projection of x, where the paper's memories
    all read x_t: `memory_inputs`, "shared" (default: one projection feeds every memory) or
    "projected";
  - (off by default) v l2-normalised like q and k: `normalize_values=True` (the paper normalises q
    and k only).
`paper_literal=True` selects the paper's form of all four (normalize_values=False, eta_param="paper",
max_grad_norm=0, memory_inputs="shared") and overrides whatever is passed for them; from a config:
`--config.model.memory.paper_literal=True`.

Decisions on what the paper leaves open:
  - scalar rates from vector memories (docs/design.md, Decision 4): eta and alpha memories map dh -> dh like
    the others (so they can learn from (k, v_hat)); a learned read-out vector and bias per head turn
    the memory's output into the scalar, then max_lr * sigmoid or softplus (eta, `eta_param`) or
    sigmoid (alpha).
  - stability on real text (measured on hope_tiny with the embedded corpus): the paper's rates are
    unbounded and its values unnormalised, and both feed the inner loop back into itself: eta is read
    from a memory that eta itself updates, and self-generated targets M(v) grow with the memories.
    With eta = 0.1 softplus(.) and raw values, the four small memories of one layer went from ~1 to
    1e13 within 50 tokens once training had moved the parameters (NaN loss at outer step 13-17);
    bounding eta alone moved the NaN from step 13 to 17. So eta is max_lr * sigmoid(.), which keeps
    the DGD factor (I - eta k k^T) a contraction for the unit keys, and v is l2-normalised like q and
    k, which bounds every self-generated target (the output's per-head RMSNorm makes the scale of v
    irrelevant to the layer's output anyway). That fixed the small memories; the output memory (chunk
    16, an MLP whose curvature grows with its hidden activations) then diverged at outer step 51
    (1 -> 3e8 within 32 tokens), so every token's inner gradient is also clipped to `max_grad_norm`
    (`ops.MemorySpec`, per-sample clipping as in Titans implementations), which bounds each chunk's
    step by chunk * max_lr * max_grad_norm. Over hope_tiny's 200-step run with the bound and the
    clip on, normalising v makes no difference (validation loss 1.4443 with, 1.4452 without), so v
    is raw by default, as in the paper; without the clip the same run stops with a NaN at step 46.
  - targets v_hat are not stop-gradient: the outer gradient flows through the whole unrolled forward,
    targets included (docs/design.md, Decision 12); the inner gradient treats v_hat as the constant target.
  - momentum (docs/design.md, Decision 5): Titans' surprise S_t, its decay beta_t a static gate of x,
    shared by all memories of a head as eta and alpha are. The DGD rate is eta_t (Eq. 86-88).
  - the output memory's target is M_out,B(t)(v_t) as in the paper's Eq. 83-85 (`memory_target="self"`);
    `memory_target="value"` trains it on v_t directly (the paper's Eq. 79-82).
  - initial states: MLP memories start as the identity map (W1 = 0, W2 ~ N(0, 1/dh)), so every adaptive
    projection starts as its static one; matrix memories start as the identity, the output one at 0.
  - alpha's bias starts at 4 (retention ~0.98 per token); eta's at 0 (eta = max_lr / 2; "paper":
    softplus(0) = log 2 ~ 0.69).

Streaming: with a state the layer continues from any position, for any number of tokens, with the
same closed forms (`ops.stream_blocks`): a segment shorter than a chunk, a prefill, or one decode
token all equal the corresponding slice of one call over the whole sequence.

Packed rows (segment ids, `core`): at each document's first token every memory restarts from its
meta-learned initial state and the short convs stop at the boundary. Keys, values and gradients of
a chunk come from its start state, so a restart must start a chunk of both grids (documents start at
multiples of lcm(chunk_size, memory_chunk_size), checked by the model); the chunked forms run from
a chunk boundary over whole chunks, and a streaming call restarts only at its first token
(`document_start`).
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
from nl_jax.memory.ops import chunked, closed_form, presets
from nl_jax.memory.ops import structures as st
from nl_jax.metrics.profiler import part
from nl_jax.mixers.front_end import conv_silu, gated_output, l2_normalize

READ_MODES = ("boundary", "per_token")
MEMORY_TARGETS = ("self", "value")
ETA_PARAMS = ("bounded", "paper")  # eta = max_lr * sigmoid(.) | softplus(.) (see `eta_rate`)
MEMORY_INPUTS = ("projected", "shared")  # each memory reads its own projection of x | one shared input


def aligned_blocks(length: int, chunk_size: int, memory_chunk_size: int) -> bool:
    """Whether blocks of `length` tokens started at multiples of it stay on the small memories'
    chunk grid and on the output memory's grid or inside one of its chunks, so that
    `SelfModifyingTitans.core(..., aligned=True)` runs them from a carried state with no chunk
    crossing to branch on."""
    m = memory_chunk_size
    return length % chunk_size == 0 and (length % m == 0 or m % length == 0)


def input_projections(
    *, weight_decay: bool = True, memory_inputs: str = "shared", paper_literal: bool = False, **_
) -> int:
    """How many static [D] -> [H, dh] projections read x, from the layer's keyword arguments: q, k,
    v, eta (, alpha) and the gate, or, with shared inputs, the one shared input and the gate."""
    return 2 if paper_literal or memory_inputs == "shared" else 5 + weight_decay


class SelfModifyingState(NamedTuple):
    """Decode / streaming state: conv tails of q, k, v (`memory_inputs="shared"`: of the one shared
    input); the small memories, one MemoryState stacked on a leading axis in the layer's `small`
    order (all at the same position in their `chunk_size` chunk; `small_states` names them); the
    output memory. The stack is kept across calls, so a caller carrying the state from segment to
    segment (HOPE's ntp scan) does not restack and split the memories at every call."""

    conv: tuple[jax.Array, ...]
    memories: ops.MemoryState
    memory: ops.MemoryState


def eta_rate(logit, eta_param: str, max_lr: float):
    """The inner learning rate from its scalar read-out `logit` = <r_eta, M_eta(z_eta)> + b_eta.

    "bounded": max_lr * sigmoid(logit), in (0, max_lr] (nl_jax's stabiliser, docs/design.md,
    Decision 11). "paper": softplus(logit), positive and unbounded above: the paper's eta_t = M_eta(x_t)
    has no cap, and since it gives eta's memory no output nonlinearity while a learning rate must be
    positive, softplus is the closest positive form; `max_lr` is unused.
    """
    if eta_param == "bounded":
        return max_lr * jax.nn.sigmoid(logit)
    if eta_param == "paper":
        return jax.nn.softplus(logit)
    raise ValueError(f"eta_param must be one of {ETA_PARAMS}, got {eta_param!r}")


class MemoryInit(nnx.Module):
    """The meta-learned initial state of one multi-head memory: one Param per fast-weight matrix."""

    def __init__(self, spec, heads, dim, hidden, *, identity, param_dtype, rngs, distinct=False):
        """`distinct`: add a random part to the initial map, so that memories reading one shared input
        start as different functions of it (otherwise k = v at the start and the self-generated
        targets M(v) equal the reads M(k): a zero inner error)."""
        self.spec = spec
        names = ("heads", "memory_out", "memory_in")
        if spec.structure == "linear":
            eye = lambda key, shape, dtype: jnp.broadcast_to(jnp.eye(dim, dtype=dtype), shape)  # noqa: E731
            init = eye if identity else jax.nn.initializers.zeros
            if distinct:
                noise = jax.nn.initializers.normal(dim**-0.5)
                init = lambda key, shape, dtype, base=init: base(key, shape, dtype) + noise(key, shape, dtype)  # noqa: E731
            self.init_w = logical_param(rngs, init, (heads, dim, dim), names, param_dtype)
        else:  # W1 = 0: the identity map; the first inner gradients reach W1 at once, W2 once W1 moves
            w1 = jax.nn.initializers.normal(hidden**-0.5) if distinct else jax.nn.initializers.zeros
            self.init_w1 = logical_param(rngs, w1, (heads, dim, hidden), names, param_dtype)
            self.init_w2 = logical_param(
                rngs, jax.nn.initializers.normal(dim**-0.5), (heads, hidden, dim), names, param_dtype
            )

    def state(self, batch_size: int, momentum: bool) -> ops.MemoryState:
        cls = ops.LinearWeights if self.spec.structure == "linear" else ops.MLPWeights
        weights = {}
        # fast weights are float32 whatever the param dtype (docs/design.md, Decision 10)
        for name in cls._fields:
            p = getattr(self, f"init_{name}")[...].astype(jnp.float32)
            weights[name] = jnp.broadcast_to(p, (batch_size, *p.shape))
        return ops.init_state(cls(**weights), momentum=momentum)


class SelfModifyingTitans(nnx.Module):
    """Self-modifying Titans layer: x [B, T, D] -> y [B, T, D] (see the module docstring).

    Flags, each switching exactly one part (the rows of the paper's ablation table, Table 6):
      dgd=False            plain GD (no DGD erase term)
      momentum=False       no surprise momentum (no beta gate, no momentum state)
      weight_decay=False   no retention gate (no alpha memory, no alpha projection)
      adaptive_k/v=False   k / v are the static projections (no k / v memory)
      adaptive_q=True      q is read from a memory too
    Extra keyword arguments: `max_lr` (the bound of the inner learning rate, default 0.1),
    `max_grad_norm` (each token's inner gradient is clipped to this norm, default 1.0; 0: off) and
    `memory_target` ("self" or "value", the output memory's target).

    Departures from the paper's literal form (docs/design.md, Decision 11), each an option:
      normalize_values=False  raw v, the paper's form (True: l2-normalised like q and k)
      eta_param="bounded"     eta = max_lr * sigmoid(.), max_lr in (0, 1]; "paper": eta = softplus(.),
                              unbounded above (`eta_rate`), max_lr unused and not range-checked
      max_grad_norm=1.0       per-token inner gradient clipping (0: off, the paper's form)
      memory_inputs="shared"  every memory reads one shared input SiLU(conv(x W_in)), as every
                              memory of the paper's Eq. 83-88 reads x_t; the small memories start
                              from distinct random maps (`MemoryInit`, `distinct`); "projected": each
                              small memory reads its own projection of x (q, k, v through a short conv
                              and SiLU, eta and alpha linear)
      paper_literal=False     True: the paper's form, i.e. normalize_values=False, eta_param="paper",
                              max_grad_norm=0, memory_inputs="shared". It overrides those four
                              options: values passed for them alongside paper_literal=True are ignored
                              (so a config that lists every key with its default can switch to the
                              paper's form with this flag alone).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        *,
        structure: str = "mlp",
        hidden: int = 0,
        activation: str = "silu",
        chunk_size: int = 8,
        memory_chunk_size: int = 64,
        read: str = "boundary",
        dgd: bool = True,
        momentum: bool = True,
        weight_decay: bool = True,
        adaptive_k: bool = True,
        adaptive_v: bool = True,
        adaptive_q: bool = False,
        max_lr: float = 0.1,
        max_grad_norm: float = 1.0,
        normalize_values: bool = False,
        eta_param: str = "bounded",
        memory_inputs: str = "shared",
        paper_literal: bool = False,
        conv_width: int = 4,
        remat_chunks: bool = False,
        init_std: float = 0.02,
        dtype="float32",
        param_dtype="float32",
        memory_target: str = "self",
        rngs: nnx.Rngs,
    ):
        if read not in READ_MODES:
            raise ValueError(f"read must be one of {READ_MODES}, got {read!r}")
        if memory_target not in MEMORY_TARGETS:
            raise ValueError(f"memory_target must be one of {MEMORY_TARGETS}, got {memory_target!r}")
        for name, value in (("chunk_size", chunk_size), ("memory_chunk_size", memory_chunk_size)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0 means head_dim), got {hidden}")
        if paper_literal:  # overrides the four departures (see the class docstring)
            normalize_values, eta_param, max_grad_norm, memory_inputs = False, "paper", 0.0, "shared"
        if eta_param not in ETA_PARAMS:
            raise ValueError(f"eta_param must be one of {ETA_PARAMS}, got {eta_param!r}")
        if memory_inputs not in MEMORY_INPUTS:
            raise ValueError(f"memory_inputs must be one of {MEMORY_INPUTS}, got {memory_inputs!r}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.chunk_size, self.memory_chunk_size, self.read = int(chunk_size), int(memory_chunk_size), read
        self.dgd, self.momentum, self.weight_decay = dgd, momentum, weight_decay
        self.adaptive = {
            "k": adaptive_k,
            "v": adaptive_v,
            "q": adaptive_q,
            "eta": True,
            "alpha": weight_decay,
        }
        self.small = tuple(name for name, on in self.adaptive.items() if on)  # memories on `chunk_size`
        if eta_param == "bounded" and not 0 < max_lr <= 1:
            raise ValueError(
                f"max_lr must be in (0, 1] (the DGD step must not expand along k), got {max_lr}"
            )
        self.max_lr, self.remat_chunks = max_lr, remat_chunks
        self.paper_literal, self.normalize_values, self.eta_param = paper_literal, normalize_values, eta_param
        self.max_grad_norm, self.memory_inputs = max_grad_norm, memory_inputs
        self.dtype = to_dtype(dtype)
        clip = dict(max_grad_norm=max_grad_norm)
        self.spec = ops.MemorySpec(structure, "l2", activation, self_target=True, **clip)
        self.out_spec = ops.MemorySpec(
            structure, "l2", activation, self_target=memory_target == "self", **clip
        )

        h, dh = num_heads, head_dim
        lin = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        heads = lambda: Linear((d_model,), (h, dh), ("embed",), ("heads", "head_dim"), **lin)  # noqa: E731
        conv = dict(width=conv_width, channel_name="heads", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if memory_inputs == "shared":
            self.in_proj, self.in_conv = heads(), ShortConv(h * dh, **conv)
        else:
            self.q_proj, self.k_proj, self.v_proj, self.eta_proj = heads(), heads(), heads(), heads()
            self.q_conv, self.k_conv, self.v_conv = (ShortConv(h * dh, **conv) for _ in range(3))
        vec = lambda init, shape, names: logical_param(rngs, init, shape, names, param_dtype)  # noqa: E731
        self.eta_readout = vec(jax.nn.initializers.normal(init_std), (h, dh), ("heads", "head_dim"))
        self.eta_bias = vec(jax.nn.initializers.zeros, (h,), ("heads",))
        if weight_decay:
            if memory_inputs == "projected":
                self.alpha_proj = heads()
            self.alpha_readout = vec(jax.nn.initializers.normal(init_std), (h, dh), ("heads", "head_dim"))
            self.alpha_bias = vec(jax.nn.initializers.constant(4.0), (h,), ("heads",))
        if momentum:
            self.beta_proj = Linear((d_model,), (h,), ("embed",), ("heads",), **lin)
        self.gate_proj = heads()
        self.out_proj = Linear((h, dh), (d_model,), ("heads", "head_dim"), ("embed",), **lin)
        self.out_norm = RMSNorm(dh, names=("head_dim",), param_dtype=param_dtype)
        mem = dict(param_dtype=param_dtype, rngs=rngs)
        distinct = memory_inputs == "shared"
        for name in self.small:
            memory = MemoryInit(self.spec, h, dh, hidden or dh, identity=True, distinct=distinct, **mem)
            setattr(self, f"memory_{name}", memory)
        self.memory_out = MemoryInit(self.out_spec, h, dh, hidden or dh, identity=False, **mem)

    # ---------------------------------------------------------------- pieces shared with the reference

    def _convs(self) -> tuple:
        return (self.in_conv,) if self.memory_inputs == "shared" else (self.q_conv, self.k_conv, self.v_conv)

    def init_state(self, batch_size: int) -> SelfModifyingState:
        convs = tuple(c.init_state(batch_size) for c in self._convs())
        mems = self.stack_small(
            {n: getattr(self, f"memory_{n}").state(batch_size, self.momentum) for n in self.small}
        )
        return SelfModifyingState(convs, mems, self.memory_out.state(batch_size, self.momentum))

    def paths(self, x, conv_states, segment_ids=None):
        """The memory inputs before any memory: z [B, T, H, dh] per path, beta [B, T, H], conv tails
        (`segment_ids`: the convs stop at documents' first tokens)."""
        if self.memory_inputs == "shared":
            (shared,), convs = conv_silu((self.in_proj,), (self.in_conv,), x, conv_states, segment_ids)
            shared = shared.astype(jnp.float32)
            z = {name: shared for name in ("q", "k", "v", "eta", "alpha")[: 4 + self.weight_decay]}
        else:
            z, convs = self._projected_paths(x, conv_states, segment_ids)
        beta = jax.nn.sigmoid(self.beta_proj(x).astype(jnp.float32)) if self.momentum else None
        return z, beta, convs

    def _projected_paths(self, x, conv_states, segment_ids=None):
        projections, convs = (self.q_proj, self.k_proj, self.v_proj), (self.q_conv, self.k_conv, self.v_conv)
        outs, convs = conv_silu(projections, convs, x, conv_states, segment_ids)
        z = {name: u.astype(jnp.float32) for name, u in zip("qkv", outs)}
        z["eta"] = self.eta_proj(x).astype(jnp.float32)
        if self.weight_decay:
            z["alpha"] = self.alpha_proj(x).astype(jnp.float32)
        return z, convs

    def generate(self, boundary, z: dict, beta):
        """q, k, v and the rates of a block of tokens, read from the small memories' boundary states.

        Chunk layout: z [B, H, n, dh], beta [B, H, n]; `boundary`: the small memories' weights
        stacked on a leading axis in `self.small` order, all read by one batched apply (one shared
        input, or their inputs stacked).
        The one place where v's normalisation and eta's form (`normalize_values`, `eta_param`) are
        applied: the training forward, streaming / decoding (both through `_small_block`) and
        `reference_forward` (self_modifying_reference.py) all call it.
        """
        if self.memory_inputs == "shared":
            u = z[self.small[0]][None]  # every path holds the same input
        else:
            u = jnp.stack([z[n] for n in self.small])
        reads = dict(zip(self.small, st.apply(self.spec, boundary, u)))
        read = lambda n: reads[n] if n in reads else z[n]  # noqa: E731
        scalar = lambda u, r, b: jnp.einsum("bhnd,hd->bhn", u, r[...]) + b[...][:, None]  # noqa: E731
        eta = eta_rate(scalar(read("eta"), self.eta_readout, self.eta_bias), self.eta_param, self.max_lr)
        alpha = None
        if self.weight_decay:
            alpha = jax.nn.sigmoid(scalar(read("alpha"), self.alpha_readout, self.alpha_bias))
        rates = presets.self_modifying(eta, alpha, beta, dgd=self.dgd).rates
        v = l2_normalize(read("v")) if self.normalize_values else read("v")
        return l2_normalize(read("q")), l2_normalize(read("k")), v, rates

    def output(self, x, y):
        """y [B, T, H, dh] -> the layer output [B, T, D]."""
        return gated_output(x, y, self.out_norm, self.gate_proj, self.out_proj, dtype=self.dtype)

    # ---------------------------------------------------------------- the chunked / streaming path

    def _small_block(self, mems, xs, last):
        """`stream_blocks` callback: one block of tokens inside one `chunk_size` chunk.

        The small memories are stacked on a leading axis (`_stack`): they share keys and rates, so
        one batched closed-form update serves them all. The shared inputs enter with a unit leading
        axis, not copied per memory: what depends on them alone (their Gram matrices, the rates'
        products) is computed once, and their gradient is one contraction over (memory, width)
        rather than a product per memory and a sum.
        """
        z, beta = xs
        s = mems["small"]
        with part("small_memories"):
            q, k, v, rates = self.generate(s.boundary, z, beta)
            _, w, m = closed_form.chunk_update(
                self.spec,
                None,
                s.weights,
                s.momentum,
                s.boundary,
                None,
                k[None],
                v[None],
                jax.tree.map(lambda a: a[None], rates),
                last=last,
            )
        return (q, k, v, rates), {"small": (w, m)}

    def stack_small(self, mems: dict) -> ops.MemoryState:
        """The small memories' states (name -> MemoryState) as one, stacked on a leading axis in
        `small` order: the form `SelfModifyingState.memories` holds."""
        parts = [mems[n] for n in self.small]
        stack = lambda field: jax.tree.map(lambda *w: jnp.stack(w), *[getattr(p, field) for p in parts])
        return ops.MemoryState(stack("weights"), stack("momentum"), stack("boundary"), parts[0].step)

    def small_states(self, stacked: ops.MemoryState) -> dict:
        """The stacked small memories (`SelfModifyingState.memories`) by name."""
        pick = lambda tree, i: jax.tree.map(lambda w: w[i], tree)
        return {
            n: ops.MemoryState(
                pick(stacked.weights, i), pick(stacked.momentum, i), pick(stacked.boundary, i), stacked.step
            )
            for i, n in enumerate(self.small)
        }

    def aligned(self, length: int) -> bool:
        """Whether `core(..., aligned=True)` runs blocks of `length` tokens (`aligned_blocks`)."""
        return aligned_blocks(length, self.chunk_size, self.memory_chunk_size)

    def core(
        self,
        x: jax.Array,
        state: SelfModifyingState | None = None,
        *,
        aligned: bool = False,
        segment_ids: jax.Array | None = None,
        document_start: jax.Array | None = None,
    ):
        """The memory read y [B, T, H, dh] before the output head, and the new state (None in training).

        `aligned` (static): the caller guarantees that `state` sits at a boundary of the small
        memories' chunk grid, T being a multiple of their chunk, and either at a boundary of the
        output memory's grid, T a multiple of its chunk, or T dividing that chunk and the state
        a multiple of T into it (a model running whole segments, `aligned(T)`). The small memories
        (and an output memory on its grid) then run the chunked form from the state, with the chunk
        positions known at trace time; an output memory inside its chunk runs one streaming pass,
        with no branch for a crossing. The values are those of the streaming form.

        `segment_ids` [B, T] (training or `aligned`): restart at documents' first tokens (module
        docstring), which must start chunks of both grids; `document_start` [B] bool (with a
        state): x's first token starts a document, so the row's state restarts before it."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"SelfModifyingTitans expects x [B, T, {self.d_model}], got shape {x.shape}")
        b, t, _ = x.shape
        training = state is None
        # aligned segments inside one chunk of the output memory, which streams them
        inside = aligned and not training and t % self.memory_chunk_size != 0 and self.memory_chunk_size % t == 0
        if training or aligned:
            grids = [("chunk_size", self.chunk_size)]
            if not inside:  # an output memory inside one of its chunks runs no whole chunk
                grids.append(("memory_chunk_size", self.memory_chunk_size))
            for name, c in grids:
                if t % c:
                    raise ValueError(
                        f"{name} {c} does not divide the sequence length {t} (the training forward runs "
                        "whole chunks; pass a state from init_state to stream any length)"
                    )
        if segment_ids is not None and not (training or aligned):
            raise ValueError("segment ids (document restarts) need the training or the aligned chunked form")
        if training:
            state = self.init_state(b)
        elif document_start is not None:  # scalars (the chunk positions) are those of every row
            init = self.init_state(b)

            def restart(batch_axis):
                return lambda a, s: s if s.ndim == 0 else chunked.restart_where(document_start, a, s, batch_axis)

            state = SelfModifyingState(
                jax.tree.map(restart(0), init.conv, state.conv),
                jax.tree.map(restart(1), init.memories, state.memories),  # stacked ahead of the batch
                jax.tree.map(restart(0), init.memory, state.memory),
            )
        if aligned and not training:  # at a chunk boundary the boundary state is the running one
            memory = state.memory if inside else state.memory._replace(boundary=state.memory.weights)
            state = state._replace(memories=state.memories._replace(boundary=state.memories.weights), memory=memory)
        z, beta, convs = self.paths(x, state.conv, segment_ids)
        step = 0 if training or aligned else state.memories.step
        restarts = {}
        if segment_ids is not None:
            small = self.init_state(b).memories
            initial = {"small": (small.weights, small.momentum)}
            restarts = dict(restart=document_starts(segment_ids), initial=initial)
        (q, k, v, rates), mems = chunked.stream_blocks(
            self._small_block,
            {"small": state.memories},
            step,
            (z, beta),
            self.chunk_size,
            remat=self.remat_chunks,
            batch_axis=1,  # the small memories are stacked ahead of the batch
            **restarts,
        )
        out_kw = {}
        if inside:
            # Documents start on the output memory's grid, so inside one of its chunks only at the
            # block's first token, where `document_start` restarted the state above.
            out_kw = dict(within_chunk=True)
        elif restarts:
            out_kw = dict(restart=restarts["restart"], initial=self.memory_out.state(b, self.momentum))
        run = ops.memory_chunked if (training or aligned) and not inside else ops.memory_stream
        with part("output_memory"):
            y, memory = run(
                self.out_spec,
                state.memory,
                q,
                k,
                v,
                rates,
                chunk_size=self.memory_chunk_size,
                read=self.read,
                remat=self.remat_chunks,
                **out_kw,
            )
        return y, (None if training else SelfModifyingState(convs, mems["small"], memory))

    def __call__(
        self,
        x: jax.Array,
        state: SelfModifyingState | None = None,
        *,
        aligned: bool = False,
        segment_ids: jax.Array | None = None,
        document_start: jax.Array | None = None,
    ):
        """x [B, T, D] -> (y [B, T, D], state). Without a state: the training forward from the
        meta-learned initial memories (T a multiple of both chunk sizes), state None. With a state
        (`init_state` or a previous call): continues from it, any number of tokens (`aligned`,
        `segment_ids`, `document_start`: see `core`)."""
        y, state = self.core(
            x, state, aligned=aligned, segment_ids=segment_ids, document_start=document_start
        )
        return self.output(x, y), state
