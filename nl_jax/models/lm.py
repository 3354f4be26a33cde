"""The causal language-model shell every registered model is built on: token embedding, a Stack of
the model's own blocks, a final RMSNorm, and logits from an unembedding or the tied embedding table.

Parameter layout (what checkpoints and nl_jax/interop read): embed/embedding, blocks/layers/...,
final_norm/scale and, unless tied, unembed/kernel. A model subclasses `CausalLM` and hands it a block
factory; blocks follow the Stack block interface (nl_jax/models/stack.py).

Packed rows: the forward optionally takes `segment_ids` [B, T] (the document of each token,
nl_jax/data/packing.py) and hands them to every block as a keyword. What a model does with them is
one of the `data.document_boundaries` modes (nl_jax/models/registry.py), the ones it lists in
`document_boundaries`: "mask" (attention within a document) or "reset" (also every recurrent state
restarted at each document's first token). The shell's default lists only "ignore": a model that
does not read segment ids is never handed any.
"""

from collections.abc import Callable

import jax
from flax import nnx

from nl_jax.layers import Embed, RMSNorm, Unembed, to_dtype
from nl_jax.models.stack import Stack
from nl_jax.parallel.rules import constrain

RESIDUAL = ("batch", "length", "activation_embed")


class CausalLM(nnx.Module):
    """tokens -> embed -> blocks -> final norm -> logits; decoding runs the same stack with a state.

    Meets `nl_jax.models.interface.CausalModel`.
    """

    # Block keyword arguments of a decode step (a memory's token-by-token form, say).
    decode_kwargs: dict = {}
    # The data.document_boundaries modes the blocks implement when given segment ids ("ignore" needs
    # none). A model lists "mask" or "reset" only if its blocks do exactly that with segment ids;
    # both where the two coincide (attention is the only token mixer).
    document_boundaries: tuple[str, ...] = ("ignore",)

    def __init__(
        self,
        cfg,
        make_block: Callable[[nnx.Rngs], nnx.Module],
        *,
        num_layers: int | None = None,
        tie_embeddings: bool | None = None,
        rngs: nnx.Rngs,
    ):
        """`num_layers` (default cfg.num_layers) counts stack units; `tie_embeddings` (default
        cfg.tie_embeddings) is fixed by models whose reference always ties."""
        self.vocab_size = cfg.vocab_size
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        kw = dict(init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Built in this order: the order decides which random numbers each parameter gets.
        self.embed = Embed(cfg.vocab_size, cfg.d_model, **kw)
        self.blocks = Stack(
            make_block,
            cfg.num_layers if num_layers is None else num_layers,
            scan_layers=cfg.scan_layers,
            remat_policy=cfg.remat_policy,
            rngs=rngs,
        )
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        tie = cfg.tie_embeddings if tie_embeddings is None else tie_embeddings
        self.unembed = None if tie else Unembed(cfg.d_model, cfg.vocab_size, **kw)

    def _logits(self, h: jax.Array) -> jax.Array:
        h = self.final_norm(h)
        return self.embed.attend(h) if self.unembed is None else self.unembed(h)

    def _run(self, tokens: jax.Array, states=None, *, segment_ids: jax.Array | None = None, **block_kwargs):
        """tokens [B, T] through the stack from `states` (None: a training forward) -> (logits, states).
        Blocks get `segment_ids` only when given (blocks of models that ignore documents take none)."""
        if segment_ids is not None:
            block_kwargs["segment_ids"] = constrain(segment_ids, ("batch", "length"))
        h = constrain(self.embed(tokens), RESIDUAL)
        h, states = self.blocks(h, states, **block_kwargs)
        return self._logits(h), states

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens int32 [B, T] -> logits float32 [B, T, vocab_size]; `segment_ids` int32 [B, T] for
        a model whose `document_boundaries` lists "mask" or "reset"."""
        return self._run(tokens, segment_ids=segment_ids)[0]

    def init_decode_state(self, batch_size: int, max_len: int | None = None):
        """Stacked per-layer states; attention caches need max_len unless sliding-window (recurrent
        states have a constant size and ignore it)."""
        return self.blocks.init_state(batch_size, max_len)

    def decode_step(self, tokens: jax.Array, state):
        """tokens int32 [B] -> (logits float32 [B, V], new state)."""
        logits, state = self._run(tokens[:, None], state, **self.decode_kwargs)
        return logits[:, 0], state


class FormsLM(CausalLM):
    """A shell whose blocks run a fast-weight memory in one of several forms: `chunked` for training
    and multi-token streaming, `recurrent` (token by token) for decoding, `naive` as a reference.

    Meets `nl_jax.models.interface.StatefulModel`.
    """

    decode_kwargs = {"form": "recurrent"}

    def __call__(
        self, tokens: jax.Array, form: str = "chunked", segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """tokens int32 [B, T] -> logits float32 [B, T, vocab_size], the memory in `form`
        (`segment_ids` as for CausalLM)."""
        return self._run(tokens, form=form, segment_ids=segment_ids)[0]

    def forward_with_state(self, tokens: jax.Array, state, form: str = "chunked"):
        """Continue from `state` over tokens [B, T]: (logits [B, T, V], new state), equal to T decode
        steps."""
        return self._run(tokens, state, form=form)
