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
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nl_jax.layers import Embed, RMSNorm, Unembed, to_dtype
from nl_jax.models.stack import Stack
from nl_jax.parallel.rules import constrain

RESIDUAL = ("batch", "length", "activation_embed")


def _misaligned_start(segment_ids, multiple: int, model: str) -> None:
    ids = np.asarray(segment_ids)
    starts = np.nonzero(ids[:, 1:] != ids[:, :-1])[1] + 1
    bad = starts[starts % multiple != 0]
    if bad.size:
        raise ValueError(
            f"model {model!r} restarts its memories only where a document starts at a multiple of "
            f"{multiple} tokens (its chunk grid), but a document starts at position {int(bad[0])}: "
            f"pad documents to multiples of {multiple} tokens, or use data.document_boundaries='ignore'"
        )


def check_document_starts(segment_ids, multiple: int, model: str) -> None:
    """ValueError unless every document of the rows starts at a multiple of `multiple` tokens.

    Concrete segment ids are checked here; traced ones by a host callback, whose error stops the
    computation (a restart inside a chunk would silently change the chunk's gradient base)."""
    if multiple <= 1:
        return
    if isinstance(segment_ids, jax.core.Tracer):
        jax.debug.callback(lambda ids: _misaligned_start(ids, multiple, model), segment_ids)
    else:
        _misaligned_start(segment_ids, multiple, model)


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
    # Restarting a chunked memory needs documents that start on its chunk grid: the multiple of
    # tokens they must start at (1: anywhere), checked by `check_document_starts`.
    document_multiple: int = 1
    # Whether the blocks also take segment ids with a state (`forward_with_state`): the memory
    # restarts at documents' first tokens inside the block, the first token continuing the state's.
    documents_with_state: bool = False
    # Whether "mask" and "reset" differ beyond attention: the forward then takes `restart` (True:
    # "reset", False: "mask", recurrent states carried across documents); ModelFn.apply passes it.
    mask_carries_memory: bool = False
    # How decoding takes segment ids (`init_decode_state(..., documents=True)` and
    # `decode_step(tokens, state, segment_ids)`), so that a packed row decoded token by token gives
    # the training forward's logits with the row's segment ids: "blocks" (the blocks read them, e.g.
    # a KV cache keeping each slot's document), "restart" (a recurrent model whose "reset" is its
    # fresh state at a document's first token: the shell restarts those rows), or None (no support).
    documents_in_decoding: str | None = None

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

    def __call__(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None, restart: bool = True
    ) -> jax.Array:
        """tokens int32 [B, T] -> logits float32 [B, T, vocab_size]; `segment_ids` int32 [B, T] for
        a model whose `document_boundaries` lists "mask" or "reset". `restart` False (a model with
        `mask_carries_memory`): "mask", the blocks' recurrent states carried across documents."""
        if segment_ids is None:
            return self._run(tokens)[0]
        if restart or not self.mask_carries_memory:
            self._check_documents(segment_ids)
            return self._run(tokens, segment_ids=segment_ids)[0]
        return self._run(tokens, segment_ids=segment_ids, restart=False)[0]

    def _check_documents(self, segment_ids) -> None:
        if segment_ids is not None:
            check_document_starts(segment_ids, self.document_multiple, type(self).__name__)

    def init_decode_state(self, batch_size: int, max_len: int | None = None, documents: bool = False):
        """Stacked per-layer states; attention caches need max_len unless sliding-window (recurrent
        states have a constant size and ignore it). `documents`: states that also keep what
        decoding with segment ids needs (models with `documents_in_decoding`)."""
        if not documents:
            return self.blocks.init_state(batch_size, max_len)
        self._check_documents_in_decoding()
        if self.documents_in_decoding == "restart":  # the layers' states and the last token's document
            layers = self.blocks.init_state(batch_size, max_len)
            return {"layers": layers, "segment": jnp.full((batch_size,), -1, jnp.int32)}
        return self.blocks.init_state(batch_size, max_len, documents=True)

    def decode_step(self, tokens: jax.Array, state, segment_ids: jax.Array | None = None):
        """tokens int32 [B] -> (logits float32 [B, V], new state). `segment_ids` int32 [B] (a state
        made with documents=True): the tokens' documents, as the training forward takes them."""
        if segment_ids is None:
            logits, state = self._run(tokens[:, None], state, **self.decode_kwargs)
        elif self._check_documents_in_decoding() == "restart":
            return self._decode_restarting(tokens, state, segment_ids)
        else:
            kwargs = dict(self.decode_kwargs, segment_ids=segment_ids[:, None])
            logits, state = self._run(tokens[:, None], state, **kwargs)
        return logits[:, 0], state

    def _decode_restarting(self, tokens, state, segment_ids):
        """A decode step whose rows restart from a fresh state where the token's document differs
        from the previous token's, as "reset" restarts them in the training forward."""
        if not isinstance(state, dict) or "segment" not in state:
            raise ValueError(
                "decoding with segment ids needs a state that keeps the last document: "
                "init_decode_state(batch_size, max_len, documents=True)"
            )
        starts = segment_ids.astype(jnp.int32) != state["segment"]
        layers = self._restart_rows(starts, state["layers"])
        logits, layers = self._run(tokens[:, None], layers, **self.decode_kwargs)
        return logits[:, 0], {"layers": layers, "segment": segment_ids.astype(jnp.int32)}

    def _restart_rows(self, starts: jax.Array, states, part=lambda s: s):
        """`states` (the `part` of the layers' decode states they are) with the rows flagged in
        `starts` [B] taken from a fresh state. Per-row leaves have the batch on axis 1 (after the
        layers); a leaf whose size there does not follow the batch (a position counter shared by
        the rows) is kept. The fresh caches are built one slot long and not used."""
        b = starts.shape[0]
        fresh = part(self.blocks.init_state(b, 1))
        wider = jax.eval_shape(lambda: part(self.blocks.init_state(b + 1, 1)))

        def pick(new, old, shape):
            if old.ndim < 2 or shape.shape[1] == old.shape[1]:
                return old
            return jnp.where(starts.reshape((1, b) + (1,) * (old.ndim - 2)), new.astype(old.dtype), old)

        return jax.tree.map(pick, fresh, states, wider)

    def _check_documents_in_decoding(self) -> str:
        if not self.documents_in_decoding:
            raise ValueError(
                f"{type(self).__name__} decodes without segment ids (only its training forward takes "
                "them); decode each document from a fresh state instead"
            )
        return self.documents_in_decoding


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
        self._check_documents(segment_ids)
        return self._run(tokens, form=form, segment_ids=segment_ids)[0]

    def forward_with_state(
        self, tokens: jax.Array, state, form: str = "chunked", segment_ids: jax.Array | None = None
    ):
        """Continue from `state` over tokens [B, T]: (logits [B, T, V], new state), equal to T decode
        steps. `segment_ids` [B, T] (models with `documents_with_state`): the documents of the
        tokens; the first token continues the state's document (a new one starts from a fresh state)."""
        if segment_ids is not None and not self.documents_with_state:
            raise ValueError(f"{type(self).__name__}.forward_with_state takes no segment ids")
        return self._run(tokens, state, form=form, segment_ids=segment_ids)
