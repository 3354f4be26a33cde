"""Ad-hoc level stacking: HOPE-Attention from a pretrained Llama (the paper's section 7.3).

The paper turns a pretrained Transformer into a continual learner by initialising every CMS level
from a pretrained MLP and then updating the levels with the CMS rule; with inner learning rates
-> 0 the frozen pretrained model is recovered. Here the Llama's attention, norms, embeddings and
output are copied into `hope_attention` as they are (the same layout as the `transformer` import,
`nl_jax.interop.llama`), and the CMS levels of layer l start from layer l's MLP and its
post-attention norm. With one level per layer (the config `hope_attention_from_pretrained`) every
level is one pretrained MLP and, at inner lr 0, the logits are the Llama's.

A layer holds several levels in nl_jax, chained (`cms.variant="sequential"`) or summed; the paper
does not say how one MLP becomes several levels, so `level_init` says:
  - "copy": every level is a copy of the layer's MLP (the paper's words: every level from a
    pretrained MLP). With more than one level the chain applies the MLP more than once, so inner
    lr 0 is no longer the pretrained model;
  - "first": level 0 is the MLP, the others start as the identity (their output projection is 0),
    so the layer is the pretrained one at the start whatever the number of levels, and the other
    levels grow from zero under the CMS rule.
"""

from __future__ import annotations

import numpy as np

from nl_jax.interop import llama

LEVEL_INITS = ("copy", "first")


def model_config(hf: dict, levels: int) -> dict:
    """The `hope_attention` model fields of a Hugging Face Llama config.json, with `levels` CMS
    levels per layer as wide as the Llama's MLP (the `cms` fields other than `hidden` stay the
    run's own)."""
    fields = llama.model_config(hf)
    hidden = fields.pop("mlp_hidden")
    return dict(fields, name="hope_attention", cms_hidden=(hidden,) * levels)


def hope_attention_params(w: llama.LlamaWeights, levels: int, level_init: str = "copy", variant: str = "sequential"):
    """The pure parameter dict of `hope_attention` whose levels come from the Llama's MLPs."""
    if level_init not in LEVEL_INITS:
        raise ValueError(f"level_init must be one of {LEVEL_INITS}, got {level_init!r}")
    if levels < 1:
        raise ValueError(f"a HOPE-Attention layer needs at least one CMS level, got {levels}")

    def level(i: int) -> dict:
        down = w.down if i == 0 or level_init == "copy" else np.zeros_like(w.down)
        return {
            "mlp": {"gate": {"kernel": w.gate}, "up": {"kernel": w.up}, "down": {"kernel": down}},
            "norm": {"scale": w.mlp_norm},
        }

    cms = {"levels": {i: level(i) for i in range(levels)}}
    if variant == "independent":  # the levels' outputs are summed with learned weights, 1 at the start
        cms["agg"] = np.ones((w.mlp_norm.shape[0], levels), w.mlp_norm.dtype)
    layers = {
        "mixer": {name: {"kernel": getattr(w, name)} for name in ("q", "k", "v", "o")},
        "mixer_norm": {"scale": w.attn_norm},
        "cms": cms,
    }
    return llama.lm_params(w, layers)


def prepare_run(config, workdir: str):
    """The run config of `hope_attention_from_pretrained`: its model fields from the Llama's
    config.json (`config.init.checkpoint`), and, in a workdir without checkpoints, the stacked
    parameters written as its step-0 parameters-only checkpoint, which the trainer starts from
    (fresh optimizer state, data from the start). A workdir that holds a run resumes it."""
    import ml_collections
    from etils import epath

    from nl_jax.layers.linear import to_dtype
    from nl_jax.train.checkpoint import save_params_only

    directory = config.init.checkpoint
    if not directory:
        raise ValueError(
            "init.checkpoint is empty: pass --config.init.checkpoint=DIR, a Hugging Face Llama directory"
        )
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked: the model fields are replaced
    levels = len(config.model.cms.periods)
    hf = llama.read_hf_config(directory)
    fields = model_config(hf, levels)
    config.model.cms.hidden = fields.pop("cms_hidden")
    config.model.update(fields)
    checkpoints = epath.Path(workdir) / "checkpoints"
    if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        return config
    _, weights = llama.read_weights(directory, to_dtype(config.model.param_dtype))
    params = hope_attention_params(weights, levels, config.init.level_init, config.model.cms.variant)
    meta = {"initialised_from": directory, "level_init": config.init.level_init}
    save_params_only(workdir, params, config.model.to_dict(), meta)
    print(
        f"initialised from {directory}: {config.model.num_layers} layers, d_model {config.model.d_model}, "
        f"{levels} CMS level(s) per layer from its MLP (level_init={config.init.level_init})"
    )
    return config
