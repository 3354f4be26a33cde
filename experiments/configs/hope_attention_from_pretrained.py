"""HOPE-Attention from a pretrained Llama by ad-hoc level stacking (the paper's section 7.3).

    python -m experiments.pretrain --config=hope_attention_from_pretrained \
        --config.init.checkpoint=LLAMA_DIR --workdir=runs/stacked

LLAMA_DIR is a Hugging Face Llama directory (config.json + safetensors). The model's shape is read
from it; attention, norms and embeddings are the Llama's, and each layer's CMS level starts from
that layer's MLP (nl_jax/interop/stacking.py), so at step 0 the model computes the Llama's logits.
Training then continues with the CMS update rule (next-token signal, one level per layer updated
every 16 tokens). `optim.trainable` (a regular expression over parameter paths) freezes everything
else; "" trains every parameter. More levels per layer: `--config.model.cms.periods=16,64
--config.model.cms.inner_lr=1e-3,1e-3` with `init.level_init=first` (the new levels start as the
identity) or `copy` (every level a copy of the MLP).

The data section is the base config's (the embedded corpus, bytes): set `data.*` to the corpus and
tokenizer the checkpoint was trained with.
"""

import ml_collections

from experiments.configs import hope_base


def get_config():
    config = hope_base.get_config("hope_attention")
    # The shape below is a placeholder the checkpoint's config.json replaces; it keeps this config
    # buildable on its own (tests build every named config).
    config.model.update(vocab_size=260, d_model=128, num_layers=4, num_heads=4, tie_embeddings=False)
    config.model.cms.update(periods=(16,), hidden=(352,), inner_lr=(1e-3,))
    config.init = ml_collections.ConfigDict(
        dict(
            checkpoint="",  # a Hugging Face Llama directory (required)
            level_init="first",  # first | copy: how levels beyond the first start (stacking.LEVEL_INITS)
        )
    )
    config.optim.update(trainable="/cms/", lr=1e-4, warmup_steps=20)
    return config
