"""Model registry: `model_cfg.name` -> model class, plus parameter counting without allocation.

Every registered model is built on the language-model shell (`nl_jax.models.lm.CausalLM`) and meets
the protocols of `nl_jax.models.interface`:

    model = build_model(model_cfg, nnx.Rngs(seed))
    logits = model(tokens)                               # int32 [B, T] -> float32 [B, T, V]; causal
    state = model.init_decode_state(batch_size, max_len) # max_len sizes attention caches
    logits, state = model.decode_step(tokens, state)     # int32 [B] -> float32 [B, V]

so that feeding a sequence token by token through decode_step gives the same logits as the full
forward. Models with a multi-token stateful path (`StatefulModel`) also offer
`forward_with_state(tokens [B, T], state) -> (logits [B, T, V], state)`, equal to T decode steps.
A model class is registered with `@register("name")` and is constructed as `cls(model_cfg,
rngs=rngs)`. Every module of the `nl_jax.models` package is imported on the first lookup, so a new
model file registers itself by existing.

Packed rows (`data.document_boundaries`, checked by `check_document_boundaries`): "ignore" lets
attention and recurrent states run across the documents of a row (GPT-style packing, the default);
"mask" keeps attention within a document; "reset" also restarts every recurrent / fast-weight state
at each document's first token. A model class lists the modes it implements in
`document_boundaries` (nl_jax/models/lm.py) and then takes `model(tokens, segment_ids=...)`:

    transformer                        ignore, mask, reset  (attention only: reset is mask)
    retnet, deltanet, gated_deltanet   ignore, reset        (retention 0 at a document's first token)
    samba                              ignore, mask, reset  (mask: the Mamba state carries over)
    titans (every variant), dla,       ignore, mask, reset  (mask: attention only, the memories carry
    memora                                                  over; reset as for ttt and hope)
    ttt, hope                          ignore, reset        (memories restart from their meta-learned
                                                            initial states; documents must start on
                                                            the chunk grid, `document_multiple`, where
                                                            data.document_alignment lays them)
    hope_attention                     ignore, mask, reset  (attention only mixer; CMS levels carry over,
                                                            as they do for hope)

Segment ids reach the training forward; `forward_with_state` takes them for the classes with
`documents_with_state` (retnet, deltanet, gated_deltanet) and `decode_step` for those with
`documents_in_decoding` (`init_decode_state(..., documents=True)`; transformer and samba keep the
documents in their KV caches, the linear family, comba, rwkv7, ttt and titans lmm restart rows
from a fresh state where the document changes, titans mag / mal do both).

A model class may also provide `forward_flops_per_token(model_cfg, seq_len) -> float`, the analytic
forward FLOPs per token including inner (fast-weight) loops, which the trainer uses for MFU.
"""

import difflib
import importlib
import math
import pkgutil

import jax
from flax import nnx

_REGISTRY: dict[str, type] = {}

DOCUMENT_BOUNDARIES = ("ignore", "mask", "reset")
_UNSUPPORTED = {
    "mask": "its blocks do not mask attention by document",
    "reset": "its blocks do not restart every recurrent or fast-weight state at a document's first token",
}


def register(name: str):
    """Class decorator: makes `build_model` construct `cls(model_cfg, rngs=rngs)` for `name`."""

    def wrap(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name]}")
        _REGISTRY[name] = cls
        return cls

    return wrap


def _import_model_modules() -> None:
    package = importlib.import_module("nl_jax.models")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"nl_jax.models.{info.name}")


def registered_models() -> tuple[str, ...]:
    _import_model_modules()
    return tuple(sorted(_REGISTRY))


def get_model_class(name: str) -> type:
    names = registered_models()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model name {name!r}{hint} (registered: {', '.join(names)})")
    return _REGISTRY[name]


def check_document_boundaries(model_name: str, mode: str) -> None:
    """ValueError unless model `model_name` implements `data.document_boundaries` = `mode`."""
    if mode not in DOCUMENT_BOUNDARIES:
        raise ValueError(f"data.document_boundaries must be one of {DOCUMENT_BOUNDARIES}, got {mode!r}")
    cls = get_model_class(model_name)
    supported = getattr(cls, "document_boundaries", ("ignore",))
    if mode not in supported:
        reason = getattr(cls, "document_reasons", {}).get(mode, _UNSUPPORTED[mode])  # a model's own
        raise ValueError(
            f"data.document_boundaries={mode!r} is not supported by model {model_name!r} "
            f"({reason}); it supports {', '.join(map(repr, supported))}"
        )


# Model settings renamed since checkpoints were first written: (sub-config, old name, new name).
RENAMED_FIELDS = (("memory", "eta_max", "max_lr"),)


def upgrade_model_config(model: dict) -> dict:
    """A saved model config (a run's config.json or a checkpoint's meta) with renamed settings under
    their current names, so a workdir written before a rename restores and resumes."""
    model = dict(model)
    for section, old, new in RENAMED_FIELDS:
        sub = model.get(section)
        if isinstance(sub, dict) and old in sub and new not in sub:
            sub = dict(sub)
            sub[new] = sub.pop(old)
            model[section] = sub
    return model


def document_multiple(model_cfg) -> int:
    """The multiple of tokens at which the model's documents must start for "reset" (its chunk
    grid, `document_multiple` of nl_jax/models/lm.py; 1: anywhere), read off an abstract build."""
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0)))
    return int(getattr(abstract, "document_multiple", 1))


def check_document_alignment(model_cfg, mode: str, alignment: int) -> None:
    """ValueError when "reset" needs documents on a chunk grid that `data.document_alignment` does
    not lay them on (the forward would stop at the first document off the grid)."""
    if mode != "reset":
        return
    multiple = document_multiple(model_cfg)
    if multiple > 1 and max(alignment, 1) % multiple:
        raise ValueError(
            f"data.document_boundaries='reset' restarts the memories of model {model_cfg.name!r} only "
            f"where a document starts on its chunk grid of {multiple} tokens, which "
            f"data.document_alignment={alignment} does not keep: set data.document_alignment to a "
            f"multiple of {multiple}"
        )


def build_model(model_cfg, rngs: nnx.Rngs) -> nnx.Module:
    """Instantiates the model named `model_cfg.name` with parameters from `rngs`."""
    return get_model_class(model_cfg.name)(model_cfg, rngs=rngs)


def count_params(model_cfg) -> int:
    """Total number of nnx.Param elements, from shapes only (jax.eval_shape: nothing allocated)."""
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
