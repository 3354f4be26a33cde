"""The TTT layer (Sun et al. 2024, "Learning to (Learn at Test Time)"): TTT-Linear and TTT-MLP.

Follows ttt-lm-jax (`ttt/models/ttt_layer.py`: `TTTBase`, `TTTLinear`, `TTTMLP`,
`process_mini_batch`); the model around it is `nl_jax.models.ttt`. The hidden state of each head is
an inner model f, trained online by mini-batch gradient descent on a self-supervised reconstruction
loss. Per head, with head_dim D and mini-batch (chunk) size C (16):

    xqk = x W_q;  q = conv_q(xqk);  k = conv_k(xqk);  v = x W_v     convs with bias, RoPE on q, k
                                                                    at position t mod C
    f(z) = LN(z W + b)                                TTT-Linear  (W [D, D])
    f(z) = LN(GELU(z W1 + b1) W2 + b2)                TTT-MLP     (W1 [D, 4D], W2 [4D, D])
    LN: per-head LayerNorm with learned scale and shift (`ttt_norm`), not a fast weight
    inner loss  l(f; k_s, v_s) = 1/2 || f(k_s) - (v_s - k_s) ||^2     (gradient through the LN)
    eta_s = base_lr * sigmoid(x_s theta_h + c_h) / D                  (`learnable_ttt_lr`)
    tau_t = max(1/(i+1) + o_i, 0), i = t mod C, o learned, init 0     (`token_idx` +
                                                                       `learnable_token_idx`)
    f_t = f_B - tau_t sum_{s in B, s <= t} eta_s grad l(f_B; k_s, v_s)   all fast weights and
                                                                    biases; gradients at the
                                                                    mini-batch start f_B
    z_t = q_t + f_t(q_t)                                            (the dual form's read)
    next mini-batch starts from f_B - tau_{C-1} sum_{s in B} eta_s grad l(f_B; k_s, v_s)
    y = W_o (post_norm(z) * GELU(x W_g))                           post LayerNorm, output gate

The inner loop is the associative-memory core (`nl_jax.memory.ops`, preset `ttt`): fast biases are
one-column weight matrices on a constant input (`bias=True`), the inner LayerNorm is the memory's
output-branch norm (`norm=True`, its scale and shift passed as `ops.InnerNorm`), eta is the
per-token rate `lr` and tau the per-token `delta_scale` (token t reads W_B + tau_t (W_t - W_B), a
mini-batch hands on its scaled state). TTT-Linear is the core's `linear` memory fitted to v - k
(the residual k is added back to the read); TTT-MLP is the core's residual `mlp` memory,
z + LN(W1 s(W2 z + b2) + b1), fitted to v. The chunked form is the dual form; `form="naive"` is the
token-by-token reference with `jax.grad` and the same mini-batch semantics.

Differences from ttt-lm-jax, none of them in the math of the layer:
  * RoPE uses the rotate-half layout (pairs (i, i + D/2)) instead of interleaved pairs: a fixed
    permutation of each head's channels, absorbed by the parameters around it (W_q, the convs, W_v,
    the inner model and norm, the post norm, W_g, W_o; all initialised per channel alike);
  * the weight decay follows this project's trainer (matrices only; the inner LayerNorm, the fast
    biases' initial values and the token offsets are stored as vectors and not decayed), where
    ttt-lm-jax decays every parameter;
  * TTT-MLP's inner-lr warm-up (`ttt_base_lr_init`, `ttt_base_lr_warmup`: base lr ramped from 0.01
    to 0.1 over the first 10% of steps) is a trainer schedule and is not implemented.

Packed rows (`data.document_boundaries`="reset", segment ids given to the chunked training forward):
the inner model restarts from its meta-learned initial state at each document's first token and
every conv stops at the boundary. A mini-batch takes its gradients at its start state, and RoPE and
tau count positions within it, so a restart must start a mini-batch: documents must start at
multiples of mini_batch_size (checked).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers.conv import ShortConv, document_starts
from nl_jax.layers.linear import Linear, logical_param, to_dtype
from nl_jax.layers.norms import LayerNorm
from nl_jax.layers.rotary import apply_rope
from nl_jax.memory import ops
from nl_jax.memory.ops import presets

TTT_LAYERS = ("linear", "mlp")
FORMS = ("chunked", "naive", "recurrent")


class BiasedConv(nnx.Module):
    """Causal depthwise conv with a bias (flax nn.Conv with padding='CAUSAL', as in ttt-lm-jax)."""

    def __init__(self, channels: int, *, width: int, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = ShortConv(channels, width=width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bias = logical_param(None, jax.nn.initializers.zeros, (channels,), ("embed",), param_dtype)

    def init_state(self, batch_size: int):
        return self.conv.init_state(batch_size)

    def __call__(self, x, state=None, segment_ids=None):
        y, state = self.conv.forward(x, state, segment_ids)
        return y + self.bias[...].astype(y.dtype), state


class TTTState(NamedTuple):
    """Decode state of one TTT layer: conv tails of q and k, and the inner model's fast state
    (its `step` is the position inside the current mini-batch)."""

    q_conv: jax.Array
    k_conv: jax.Array
    memory: ops.MemoryState


class TTTLayer(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        if cfg.ttt_layer not in TTT_LAYERS:
            raise ValueError(f"ttt_layer must be one of {TTT_LAYERS}, got {cfg.ttt_layer!r}")
        d, h = cfg.d_model, cfg.num_heads
        if d % h:
            raise ValueError(f"d_model={d} is not divisible by num_heads={h}")
        if cfg.mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {cfg.mini_batch_size}")
        hd = d // h
        self.num_heads, self.head_dim, self.chunk = h, hd, cfg.mini_batch_size
        self.base_lr = cfg.ttt_base_lr or {"linear": 1.0, "mlp": 0.1}[cfg.ttt_layer]
        self.rope_theta = cfg.rope_theta
        self.structure = cfg.ttt_layer
        self.dtype = to_dtype(cfg.dtype)
        dtype, param_dtype = cfg.dtype, cfg.param_dtype
        lin = dict(init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        heads = ("heads", "head_dim")
        self.wq = Linear((d,), (h, hd), ("embed",), heads, **lin)  # shared by q and k, as in TTT
        self.wv = Linear((d,), (h, hd), ("embed",), heads, **lin)
        self.wg = Linear((d,), (d,), ("embed",), ("mlp",), **lin)
        self.wo = Linear((d,), (d,), ("mlp",), ("embed",), **lin)
        conv = dict(width=cfg.conv_width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_conv, self.k_conv = BiasedConv(d, **conv), BiasedConv(d, **conv)
        self.lr_proj = Linear((d,), (h,), ("embed",), ("heads",), **lin)
        self.lr_bias = logical_param(None, jax.nn.initializers.zeros, (h,), ("heads",), param_dtype)
        self.post_norm = LayerNorm(d, eps=cfg.norm_eps, param_dtype=param_dtype)
        # Per-head vectors, stored flat ([heads * width]) like the other norm scales and biases.
        ones, zeros = jax.nn.initializers.ones, jax.nn.initializers.zeros
        vec = lambda init, n: logical_param(None, init, (n,), ("norm",), param_dtype)  # noqa: E731
        self.ttt_norm_scale, self.ttt_norm_shift = vec(ones, d), vec(zeros, d)
        self.learnable_token_idx = logical_param(None, zeros, (self.chunk,), (None,), param_dtype)
        # Meta-learned initial inner model (TTT: W ~ N(0, 0.02), MLP output side / sqrt(2 L); biases 0).
        names = ("heads", "memory_out", "memory_in")
        std = cfg.init_std
        if cfg.ttt_layer == "linear":
            self.bias_widths = (("b", hd),)
            self.memory_init_w = logical_param(rngs, jax.nn.initializers.normal(std), (h, hd, hd), names)
        else:
            hid = cfg.ttt_mlp_expand * hd
            self.bias_widths = (("b1", hd), ("b2", hid))
            out_std = std / (2 * cfg.num_layers) ** 0.5
            self.memory_init_w1 = logical_param(
                rngs, jax.nn.initializers.normal(out_std), (h, hd, hid), names
            )
            self.memory_init_w2 = logical_param(rngs, jax.nn.initializers.normal(std), (h, hid, hd), names)
        for name, width in self.bias_widths:
            setattr(self, f"memory_init_{name}", vec(zeros, h * width))
        self.spec = self._mechanism(jnp.zeros(()), jnp.zeros(())).spec

    def _mechanism(self, lr, tau) -> presets.Mechanism:
        return presets.ttt(lr, self.structure, "gelu", bias=True, norm=True, token_scale=tau)

    def _initial_memory(self, batch_size: int) -> ops.MemoryState:
        cls = ops.LinearBiasWeights if self.structure == "linear" else ops.MLPBiasWeights
        weights, widths = {}, dict(self.bias_widths)
        # fast weights in float32 whatever the compute dtype (docs/design.md, Decision 10)
        for name in cls._fields:
            p = getattr(self, f"memory_init_{name}")[...].astype(jnp.float32)
            if name in widths:  # a bias is a one-column matrix [H, width, 1]
                p = p.reshape(self.num_heads, widths[name], 1)
            weights[name] = jnp.broadcast_to(p, (batch_size, *p.shape))
        return ops.init_state(cls(**weights), momentum=False)

    def _inner_norm(self) -> ops.InnerNorm:
        per_head = lambda p: p[...].astype(jnp.float32).reshape(self.num_heads, self.head_dim)  # noqa: E731
        return ops.InnerNorm(per_head(self.ttt_norm_scale), per_head(self.ttt_norm_shift))

    def init_state(self, batch_size: int) -> TTTState:
        return TTTState(
            self.q_conv.init_state(batch_size),
            self.k_conv.init_state(batch_size),
            self._initial_memory(batch_size),
        )

    def _inputs(self, x, state: TTTState | None, segment_ids=None):
        b, t, _ = x.shape
        h, hd = self.num_heads, self.head_dim
        xqk = self.wq(x).reshape(b, t, h * hd)
        q, q_conv = self.q_conv(xqk, None if state is None else state.q_conv, segment_ids)
        k, k_conv = self.k_conv(xqk, None if state is None else state.k_conv, segment_ids)
        start = 0 if state is None else state.memory.step  # position inside the current mini-batch
        pos = (start + jnp.arange(t)) % self.chunk
        q = apply_rope(q.reshape(b, t, h, hd), pos, self.rope_theta).astype(jnp.float32)
        k = apply_rope(k.reshape(b, t, h, hd), pos, self.rope_theta).astype(jnp.float32)
        v = self.wv(x).astype(jnp.float32)
        gate = jax.nn.sigmoid(self.lr_proj(x).astype(jnp.float32) + self.lr_bias[...])
        lr = self.base_lr * gate / self.head_dim  # [B, T, H]
        offset = self.learnable_token_idx[...].astype(jnp.float32)[pos]
        tau = jnp.maximum(1.0 / (pos + 1.0) + offset, 0.0)  # [T]: the mean over the mini-batch so far
        tau = jnp.broadcast_to(tau[None, :, None], lr.shape)
        if self.structure == "linear":
            v = v - k  # TTT's target v - k; the residual k + f(k) is added back to the read below
        return q, k, v, lr, tau, q_conv, k_conv

    def __call__(
        self, x: jax.Array, state: TTTState | None = None, *, form: str = "chunked", segment_ids=None
    ):
        """x [B, T, D] -> (y [B, T, D], new state; None when `state` is None).

        form: `chunked` (the dual form; without a state T must be a multiple of mini_batch_size,
        with one any length from any position, `ops.memory_stream`), `naive` (the token-by-token
        reference with jax.grad), `recurrent` (decode steps, scanned). `segment_ids` [B, T]
        (chunked, no state): restart at documents' first tokens (module docstring).
        """
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        b, t, _ = x.shape
        if form == "chunked" and state is None and t % self.chunk:
            raise ValueError(f"mini_batch_size {self.chunk} does not divide the sequence length {t}")
        if segment_ids is not None and (form != "chunked" or state is not None):
            raise ValueError("segment ids (document restarts) need the chunked training forward (no state)")
        q, k, v, lr, tau, q_conv, k_conv = self._inputs(x, state, segment_ids)
        mech = self._mechanism(lr, tau)
        memory = self._initial_memory(b) if state is None else state.memory
        kw = dict(chunk_size=self.chunk, read=mech.read, norm=self._inner_norm())
        if segment_ids is not None:
            restart = dict(restart=document_starts(segment_ids), initial=memory)
            z, memory = ops.memory_chunked(mech.spec, memory, q, k, v, mech.rates, **kw, **restart)
        elif form == "chunked" and state is None:
            z, memory = ops.memory_chunked(mech.spec, memory, q, k, v, mech.rates, **kw)
        elif form == "chunked":
            z, memory = ops.memory_stream(mech.spec, memory, q, k, v, mech.rates, **kw)
        elif form == "naive":
            z, memory = ops.memory_naive(mech.spec, memory, q, k, v, mech.rates, **kw)
        else:
            z, memory = ops.memory_recurrent_scan(mech.spec, memory, q, k, v, mech.rates, **kw)
        if self.structure == "linear":
            z = q + z  # the MLP memory of the core is residual already: z = q + f(q)
        z = self.post_norm(z.reshape(b, t, -1).astype(self.dtype))
        y = self.wo(z * jax.nn.gelu(self.wg(x)))
        return y, (None if state is None else TTTState(q_conv, k_conv, memory))
