"""TTT baseline (Sun et al. 2024, "Learning to (Learn at Test Time)"): TTT-Linear and TTT-MLP
language models, following ttt-lm-jax (`ttt/models/model.py`: `Block` with `pre_conv`, the `*-TTT`
configs). The layer and its equations are in `nl_jax.mixers.ttt`.

Backbone (ttt-lm-jax "Mamba backbone", `pre_conv=True`): each block is
`h = x + Conv(RMSNorm(x))`, `h = h + TTT(RMSNorm(h))`, `y = h + SwiGLU(RMSNorm(h))`, tied embeddings.

Config (`model` section, see experiments/configs/ttt_base.py): the transformer fields plus
ttt_layer ('linear' | 'mlp'), mini_batch_size, ttt_base_lr (0: 1.0 linear, 0.1 mlp as in
ttt-lm-jax), ttt_mlp_expand, conv_width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from flax import nnx

from nl_jax.layers.linear import to_dtype
from nl_jax.layers.mlp import SwiGLU
from nl_jax.layers.norms import RMSNorm
from nl_jax.mixers.ttt import BiasedConv, TTTLayer, TTTState
from nl_jax.models.lm import RESIDUAL, FormsLM
from nl_jax.models.registry import register
from nl_jax.parallel.rules import constrain


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

    def init_state(self, batch_size: int, max_len: int | None = None) -> TTTBlockState:
        del max_len  # constant size
        return TTTBlockState(self.conv.init_state(batch_size), self.ttt.init_state(batch_size))

    def __call__(self, x, state: TTTBlockState | None = None, form: str = "chunked", segment_ids=None):
        c, pre = self.conv(self.conv_norm(x), None if state is None else state.pre_conv, segment_ids)
        h = x + c.astype(x.dtype)
        a, inner = self.ttt(
            self.ttt_norm(h), None if state is None else state.ttt, form=form, segment_ids=segment_ids
        )
        h = h + a
        y = h + self.mlp(self.mlp_norm(h))
        return constrain(y, RESIDUAL), (None if state is None else TTTBlockState(pre, inner))


@register("ttt")
class TTT(FormsLM):
    """The shell around `num_layers` TTTBlocks. The chunked form of the training forward needs T a
    multiple of mini_batch_size; `forward_with_state` takes any T from any position (the dual form
    through `ops.memory_stream`)."""

    document_boundaries = ("ignore", "reset")
    documents_in_decoding = "restart"  # "reset" is the fresh state at a document's first token

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        # tied embeddings, as in ttt-lm-jax
        super().__init__(cfg, lambda r: TTTBlock(cfg, rngs=r), tie_embeddings=True, rngs=rngs)
        self.document_multiple = cfg.mini_batch_size  # restarts start mini-batches (module docstring)

    @staticmethod
    def forward_flops_per_token(cfg, seq_len: int) -> float:
        """Analytic forward FLOPs per token: projections, convs, SwiGLU, the chunked inner loop
        (per head: boundary gradient, intra-chunk reads C x C, end-of-chunk update) and the logits."""
        del seq_len  # the inner loop costs the same per token at any length
        d, f, c = cfg.d_model, cfg.mlp_hidden, cfg.mini_batch_size
        hd = d // cfg.num_heads
        dense = 2 * (4 * d * d + d * cfg.num_heads + 3 * d * f) + 3 * 2 * cfg.conv_width * d
        # Per weight matrix [O, I]: K W0, Q W0 and the end-of-chunk update (3 O I), the chunk's
        # Gram matrix and its product with the errors (C (I + O)); a bias is a matrix with I = 1.
        mat = lambda o, i: 2 * (3 * o * i + c * (i + o))  # noqa: E731
        if cfg.ttt_layer == "linear":
            inner = mat(hd, hd) + mat(hd, 1)
        else:
            hid = cfg.ttt_mlp_expand * hd
            # plus the backpropagated error through W1 (one more dense product)
            inner = mat(hd, hid) + mat(hid, hd) + mat(hd, 1) + mat(hid, 1) + 2 * hd * hid
        return float(cfg.num_layers * (dense + cfg.num_heads * inner) + 2 * d * cfg.vocab_size)
