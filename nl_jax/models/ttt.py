"""TTT baseline (Sun et al. 2024, "Learning to (Learn at Test Time)"): TTT-Linear and TTT-MLP.

The hidden state of each head is a model f (linear, or a 2-layer MLP with 4x hidden and GELU)
trained online by mini-batch gradient descent on a self-supervised reconstruction loss; the inner
loop runs through the associative-memory core (`nl_jax.memory.ops`, preset `ttt`, `post_update`
read: token t sees the updates of its chunk up to and including itself, the TTT dual form):

    xqk = x W_q;  q = conv_q(xqk) + b_q;  k = conv_k(xqk) + b_k;  v = x W_v    per head, RoPE on q, k
                                                                              at position t mod C
    eta_t = base_lr * sigmoid(x_t W_lr + b_lr) / (head_dim * C)               per token and head
    inner loss  l(f; k_t, v_t) = 1/2 || k_t + f(k_t) - v_t ||^2               (TTT: target v - k)
    f_t = f_{t-1} - eta_t grad l(f_B; k_t, v_t)       gradients at the start of the mini-batch B
    z_t = q_t + f_t(q_t)
    y = W_o (LayerNorm(z) * GELU(x W_g))

Backbone (ttt-lm-jax "Mamba backbone", `pre_conv=True`): each block is
`h = x + Conv(RMSNorm(x))`, `h = h + TTT(RMSNorm(h))`, `y = h + SwiGLU(RMSNorm(h))`, tied embeddings.

Differences from ttt-lm-jax, because the memory core's objective is a plain l2 on a bias-free
memory (documented, not hidden):
  * no inner LayerNorm: TTT reconstructs with LN(f(k)) (per-head learnable scale and shift) and
    reads q + LN(f(q)); here f is fitted and read without it;
  * no fast-weight biases (b1 / b2 of TTT's inner model);
  * the mini-batch average: TTT scales the gradient sum seen by token i of a mini-batch by a
    learnable 1/(i+1) (`token_idx`); the core's sum cannot depend on the reading position, so the
    fixed 1/C is used. The state carried to the next mini-batch (the end-of-batch update, 1/C) is
    then exactly TTT's at its initialisation; reads inside a mini-batch take smaller steps.
The learnable inner learning rate, the RoPE within a mini-batch, the conv on q/k, the output
LayerNorm and GELU gate are as in ttt-lm-jax.

Config (`model` section, see experiments/configs/ttt_base.py): the transformer fields plus
ttt_layer ('linear' | 'mlp'), mini_batch_size, ttt_base_lr (0: 1.0 linear, 0.1 mlp as in
ttt-lm-jax), ttt_mlp_expand, conv_width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers.conv import ShortConv
from nl_jax.layers.embed import Embed
from nl_jax.layers.linear import Linear, logical_param, to_dtype
from nl_jax.layers.mlp import SwiGLU
from nl_jax.layers.norms import RMSNorm
from nl_jax.layers.rotary import apply_rope
from nl_jax.memory import ops
from nl_jax.memory.ops import presets
from nl_jax.models.registry import register
from nl_jax.models.stack import Stack
from nl_jax.parallel.rules import constrain

_RESIDUAL = ("batch", "length", "activation_embed")
TTT_LAYERS = ("linear", "mlp")
FORMS = ("chunked", "naive", "recurrent")


class LayerNorm(nnx.Module):
    """LayerNorm with scale and shift (TTT's output norm), statistics in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = logical_param(None, jax.nn.initializers.ones, (dim,), ("norm",), param_dtype)
        self.bias = logical_param(None, jax.nn.initializers.zeros, (dim,), ("norm",), param_dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class BiasedConv(nnx.Module):
    """Causal depthwise conv with a bias (flax nn.Conv with padding='CAUSAL', as in ttt-lm-jax)."""

    def __init__(self, channels: int, *, width: int, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = ShortConv(channels, width=width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bias = logical_param(None, jax.nn.initializers.zeros, (channels,), ("embed",), param_dtype)

    def init_state(self, batch_size: int):
        return self.conv.init_state(batch_size)

    def __call__(self, x, state=None):
        y, state = self.conv.forward(x, state)
        return y + self.bias[...].astype(y.dtype), state


class TTTState(NamedTuple):
    """Decode state of one TTT layer: conv tails of q and k, and the inner model's fast state."""

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
        hd = d // h
        self.num_heads, self.head_dim, self.chunk = h, hd, cfg.mini_batch_size
        self.base_lr = cfg.ttt_base_lr or {"linear": 1.0, "mlp": 0.1}[cfg.ttt_layer]
        self.rope_theta = cfg.rope_theta
        self.spec = presets.ttt(jnp.zeros(()), cfg.ttt_layer, "gelu").spec
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
        # Meta-learned initial inner model (TTT: W ~ N(0, 0.02); MLP output side / sqrt(2 L)).
        names = ("heads", "memory_out", "memory_in")
        std = cfg.init_std
        if cfg.ttt_layer == "linear":
            self.weight_names = ("w",)
            self.memory_init_w = logical_param(rngs, jax.nn.initializers.normal(std), (h, hd, hd), names)
        else:
            hid = cfg.ttt_mlp_expand * hd
            self.weight_names = ("w1", "w2")
            out_std = std / (2 * cfg.num_layers) ** 0.5
            self.memory_init_w1 = logical_param(
                rngs, jax.nn.initializers.normal(out_std), (h, hd, hid), names
            )
            self.memory_init_w2 = logical_param(rngs, jax.nn.initializers.normal(std), (h, hid, hd), names)

    def _initial_memory(self, batch_size: int) -> ops.MemoryState:
        cls = ops.LinearWeights if self.spec.structure == "linear" else ops.MLPWeights
        weights = {}
        for name in self.weight_names:  # fast weights in float32 whatever the compute dtype (D10)
            p = getattr(self, f"memory_init_{name}")[...].astype(jnp.float32)
            weights[name] = jnp.broadcast_to(p, (batch_size, *p.shape))
        return ops.init_state(cls(**weights), momentum=False)

    def init_state(self, batch_size: int) -> TTTState:
        return TTTState(
            self.q_conv.init_state(batch_size),
            self.k_conv.init_state(batch_size),
            self._initial_memory(batch_size),
        )

    def _inputs(self, x, state: TTTState | None):
        b, t, _ = x.shape
        h, hd = self.num_heads, self.head_dim
        xqk = self.wq(x).reshape(b, t, h * hd)
        q, q_conv = self.q_conv(xqk, None if state is None else state.q_conv)
        k, k_conv = self.k_conv(xqk, None if state is None else state.k_conv)
        start = 0 if state is None else state.memory.step  # position inside the current mini-batch
        pos = (start + jnp.arange(t)) % self.chunk
        q = apply_rope(q.reshape(b, t, h, hd), pos, self.rope_theta).astype(jnp.float32)
        k = apply_rope(k.reshape(b, t, h, hd), pos, self.rope_theta).astype(jnp.float32)
        v = self.wv(x).astype(jnp.float32)
        gate = jax.nn.sigmoid(self.lr_proj(x).astype(jnp.float32) + self.lr_bias[...])
        lr = self.base_lr * gate / (self.head_dim * self.chunk)  # [B, T, H]
        if self.spec.structure == "linear":
            v = v - k  # TTT's target v - k; the residual k + f(k) is added back to the read below
        return q, k, v, lr, q_conv, k_conv

    def __call__(self, x: jax.Array, state: TTTState | None = None, *, form: str = "chunked"):
        """x [B, T, D] -> (y [B, T, D], new state; None when `state` is None).

        form: `chunked` (training; T a multiple of mini_batch_size, state at a mini-batch boundary),
        `naive` (the token-by-token reference with jax.grad), `recurrent` (decode steps, scanned).
        """
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        b, t, _ = x.shape
        q, k, v, lr, q_conv, k_conv = self._inputs(x, state)
        mech = presets.ttt(lr, self.spec.structure, self.spec.activation)
        memory = self._initial_memory(b) if state is None else state.memory
        kw = dict(chunk_size=self.chunk, read=mech.read)
        if form == "chunked":
            if t % self.chunk:
                raise ValueError(f"mini_batch_size {self.chunk} does not divide the sequence length {t}")
            z, memory = ops.memory_chunked(mech.spec, memory, q, k, v, mech.rates, **kw)
        elif form == "naive":
            z, memory = ops.memory_naive(mech.spec, memory, q, k, v, mech.rates, **kw)
        else:

            def step(mem, inputs):
                y, mem = ops.memory_recurrent(mech.spec, mem, *inputs, **kw)
                return mem, y

            time_major = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (q, k, v, mech.rates))
            memory, zs = jax.lax.scan(step, memory, time_major)
            z = jnp.moveaxis(zs, 0, 1)
        if self.spec.structure == "linear":
            z = q + z  # the MLP memory of the core is residual already: z = q + f(q)
        z = self.post_norm(z.reshape(b, t, -1).astype(self.dtype))
        y = self.wo(z * jax.nn.gelu(self.wg(x)))
        return y, (None if state is None else TTTState(q_conv, k_conv, memory))


class TTTBlockState(NamedTuple):
    pre_conv: jax.Array
    ttt: TTTState


class TTTBlock(nnx.Module):
    """h = x + Conv(Norm(x)); h = h + TTT(Norm(h)); y = h + SwiGLU(Norm(h))."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        dtype, param_dtype = cfg.dtype, cfg.param_dtype
        norm = lambda: RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=to_dtype(param_dtype))  # noqa: E731
        self.conv_norm, self.ttt_norm, self.mlp_norm = norm(), norm(), norm()
        self.conv = BiasedConv(
            cfg.d_model, width=cfg.conv_width, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.ttt = TTTLayer(cfg, rngs=rngs)
        self.mlp = SwiGLU(
            cfg.d_model,
            cfg.mlp_hidden,
            init_std=cfg.init_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def init_state(self, batch_size: int) -> TTTBlockState:
        return TTTBlockState(self.conv.init_state(batch_size), self.ttt.init_state(batch_size))

    def __call__(self, x, state: TTTBlockState | None = None, form: str = "chunked"):
        c, pre = self.conv(self.conv_norm(x), None if state is None else state.pre_conv)
        h = x + c.astype(x.dtype)
        if state is not None and form == "chunked":
            form = "recurrent"  # decoding goes token by token from any position
        a, inner = self.ttt(self.ttt_norm(h), None if state is None else state.ttt, form=form)
        h = h + a
        y = h + self.mlp(self.mlp_norm(h))
        return constrain(y, _RESIDUAL), (None if state is None else TTTBlockState(pre, inner))


@register("ttt")
class TTT(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        self.embed = Embed(
            cfg.vocab_size,
            cfg.d_model,
            init_std=cfg.init_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.blocks = Stack(
            lambda r: TTTBlock(cfg, rngs=r),
            cfg.num_layers,
            scan_layers=cfg.scan_layers,
            remat_policy=cfg.remat_policy,
            rngs=rngs,
        )
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)

    def __call__(self, tokens: jax.Array, *, form: str = "chunked") -> jax.Array:
        """tokens int32 [B, T] -> logits float32 [B, T, V]. `form="naive"` runs the token-by-token
        reference of the inner loop (for tests); T must be a multiple of mini_batch_size."""
        h = constrain(self.embed(tokens), _RESIDUAL)
        h, _ = self.blocks(h, form=form)
        return self.embed.attend(self.final_norm(h))  # tied embeddings, as in ttt-lm-jax

    def init_decode_state(self, batch_size: int, max_len: int | None = None):
        """Stacked per-layer states (conv tails, fast weights); constant size, max_len is unused."""
        del max_len
        # Per layer, not Stack.init_state: the initial fast weights are each layer's own Params.
        graphdef, params, rest = nnx.split(self.blocks.layers, nnx.Param, ...)
        return jax.vmap(lambda p, r: nnx.merge(graphdef, p, r).init_state(batch_size))(params, rest)

    def decode_step(self, tokens: jax.Array, state):
        """tokens int32 [B] -> (logits float32 [B, V], new state)."""
        h = self.embed(tokens[:, None])
        h, state = self.blocks(h, state)
        return self.embed.attend(self.final_norm(h))[:, 0], state

    @staticmethod
    def forward_flops_per_token(cfg, seq_len: int) -> float:
        """Analytic forward FLOPs per token: projections, convs, SwiGLU, the chunked inner loop
        (per head: boundary gradient, intra-chunk reads C x C, end-of-chunk update) and the logits."""
        del seq_len  # the inner loop costs the same per token at any length
        d, f, c = cfg.d_model, cfg.mlp_hidden, cfg.mini_batch_size
        hd = d // cfg.num_heads
        dense = 2 * (4 * d * d + d * cfg.num_heads + 3 * d * f) + 3 * 2 * cfg.conv_width * d
        if cfg.ttt_layer == "linear":
            inner = 2 * 3 * hd * hd + 2 * 2 * c * hd  # K W0, Q W0, update; Q K^T and its product
        else:
            hid = cfg.ttt_mlp_expand * hd
            # per weight matrix as above, plus the backpropagated error through W1 (7 dense products)
            inner = 2 * 7 * hd * hid + 2 * 2 * c * (hd + hid)
        return float(cfg.num_layers * (dense + cfg.num_heads * inner) + 2 * d * cfg.vocab_size)
