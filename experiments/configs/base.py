"""Base config: every named config is `base.get_config()` plus a few overrides.

Sections: `model` (what `nl_jax.models.build_model` reads), `mesh` (`nl_jax.parallel.make_mesh`),
`optim` (`nl_jax.optim.factory.make_optimizer`), `data` (`nl_jax.data.from_config`), and what the
trainer (`nl_jax.train.run`) reads: `train`, `eval`, `checkpoint`. The defaults train a tiny model on
a laptop; sized configs call `paper_recipe(config, ...)` for the paper's setting (docs/design.md, Decision 1).
Any field can be overridden on the command line: `--config.model.d_model=512`.
"""

import ml_collections

from nl_jax.data.config import default_data_config


def model_config() -> ml_collections.ConfigDict:
    """Transformer++ defaults (a 24 x 1024 shape); HOPE / Titans configs add their own fields."""
    return ml_collections.ConfigDict(
        dict(
            name="transformer",  # registry name: nl_jax.models.registry.registered_models()
            # Llama-2 tokenizer (docs/design.md, Decision 1); 260 for byte-level tiny configs (259 ids)
            vocab_size=32000,
            d_model=1024,  # residual stream width
            num_layers=24,  # number of blocks (stacked and scanned)
            num_heads=16,  # query heads
            num_kv_heads=0,  # key/value heads for GQA; 0 means = num_heads (plain MHA)
            head_dim=0,  # per-head width; 0 means d_model // num_heads
            mlp_hidden=2816,  # SwiGLU hidden width (fla: 256-multiple near 8/3 * d_model)
            rope_theta=10000.0,  # RoPE base frequency
            sliding_window=0,  # attention window in tokens (self included); 0 = full causal
            # training attention: xla (einsum) | splash (Pallas) | cudnn; nl_jax/mixers/attention_kernels.py
            attention_impl="xla",
            tie_embeddings=False,  # share the input embedding as the output projection
            norm_eps=1e-6,  # RMSNorm epsilon
            dtype="float32",  # compute dtype of matmuls/activations; "bfloat16" on TPU
            # storage dtype of parameters (float32 master weights, docs/design.md, Decision 10)
            param_dtype="float32",
            # lax.scan over the stacked layers; False unrolls them (same parameters), as the *_tiny
            # configs do: 1.1-1.2x faster steps on CPU for twice the compile (README, "HOPE training speed")
            scan_layers=True,
            remat_policy="none",  # none | full | dots_saveable | dots_with_no_batch_dims_saveable
            init_std=0.02,  # std of the normal init of every projection and the embedding
        )
    )


def mesh_config() -> ml_collections.ConfigDict:
    """Mesh axes (data, fsdp, tensor); in each of the ici / dcn groups one -1 is filled in."""
    return ml_collections.ConfigDict(
        dict(
            ici_data_parallelism=1,  # pure data parallelism inside a slice
            ici_fsdp_parallelism=-1,  # FSDP inside a slice: -1 = all remaining devices of the slice
            ici_tensor_parallelism=1,  # tensor (model) parallelism inside a slice
            dcn_data_parallelism=-1,  # across slices: -1 = number of slices (1 without multislice)
            dcn_fsdp_parallelism=1,  # FSDP across slices (rarely worth the DCN traffic)
            dcn_tensor_parallelism=1,  # tensor parallelism across slices (don't)
            sharding_tolerance=0.02,  # max excess of per-device weight memory over a perfect split
        )
    )


def optim_config() -> ml_collections.ConfigDict:
    """AdamW with warm-up + cosine (docs/design.md, Decision 1); any nl_jax.optim optimizer by name."""
    return ml_collections.ConfigDict(
        dict(
            name="adamw",  # adamw | m3 | muon | deep_momentum | delta_momentum | momentum_memory | ...
            kwargs=ml_collections.ConfigDict(),  # extra arguments of that optimizer (e.g. period=100 for m3)
            lr=4e-4,  # peak learning rate
            schedule="cosine",  # cosine | wsd (warmup-stable-decay) | constant; all with linear warm-up
            warmup_steps=100,  # linear warm-up from lr / warmup_steps to lr
            final_lr_fraction=0.1,  # cosine / wsd end at this fraction of lr
            wsd_decay_fraction=0.2,  # wsd: share of the steps spent decaying at the end
            wsd_decay_shape="linear",  # wsd: linear | cosine | sqrt
            b1=0.9,  # adamw first-moment decay
            b2=0.95,  # adamw second-moment decay
            eps=1e-8,  # adamw epsilon
            weight_decay=0.1,  # decoupled (lr * wd * W) on matrices only, for every optimizer
            clip_norm=1.0,  # clip the global gradient norm to this (0: off)
            # a regular expression over parameter paths ("blocks/layers/cms/levels/0/mlp/up/kernel"):
            # only matching parameters train, the others are frozen; "" trains every parameter
            trainable="",
        )
    )


def train_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            steps=1000,  # optimizer steps; each sees data.global_batch_size sequences
            grad_accum_steps=1,  # microbatches per step (the global batch is split, the step stays one)
            seed=0,  # parameter init seed
            log_every=50,  # steps between train-metric rows and progress lines
            profile_start_step=0,  # first step traced by jax.profiler (into workdir/profile)
            profile_steps=0,  # number of steps traced; 0: no profiling
            peak_flops_per_device=0.0,  # FLOP/s for MFU; 0: looked up from the device kind
            wandb_project="",  # log to this Weights & Biases project too (needs `pip install wandb`); "": off
        )
    )


def eval_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            every=200,  # steps between held-out evaluations (also at step 0 and at the end); 0: end only
            max_batches=0,  # batches per evaluation; 0: data.eval_max_batches, or the whole split
        )
    )


def checkpoint_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            enabled=True,  # orbax checkpoints in workdir/checkpoints (resume: re-run the same command)
            every=200,  # steps between saves (also at the end and on SIGTERM)
            max_to_keep=3,  # newest checkpoints kept (0: all)
            keep_period=0,  # also keep every checkpoint whose step is a multiple of this (0: none)
            async_save=True,  # write in the background while training continues
        )
    )


def paper_recipe(
    config, tokens: float, seq_len: int = 4096, batch_tokens: int = 2**19, grad_accum_steps: int = 1
):
    """The paper's training setting (docs/design.md, Decision 1): 4096-token context, 0.5M-token batches,
    AdamW 4e-4 cosine, wd 0.1, vocab 32000 (SentencePiece), `tokens` in total. `grad_accum_steps`: the
    microbatches of a step; the sized configs set enough for the step to fit both 32-chip slices, v5p-64 and
    v4-64 (32 GiB per chip; README table, `python -m experiments.compile`). Returns `config`."""
    batch = batch_tokens // seq_len
    config.data.update(seq_len=seq_len, global_batch_size=batch)
    config.train.update(
        steps=max(1, int(tokens // (batch * seq_len))), log_every=100, grad_accum_steps=grad_accum_steps
    )
    config.optim.update(lr=4e-4, schedule="cosine", warmup_steps=2000, weight_decay=0.1)
    config.eval.update(every=2000, max_batches=100)
    config.checkpoint.update(every=1000)
    return config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = model_config()  # the model architecture (registry name + its fields)
    config.mesh = mesh_config()  # device mesh layout
    config.optim = optim_config()  # optimizer and learning-rate schedule
    config.data = default_data_config()  # corpus, tokenizer, windows, documents (nl_jax/data/config.py)
    config.train = train_config()  # steps, accumulation, logging, profiling
    config.eval = eval_config()  # held-out evaluation
    config.checkpoint = checkpoint_config()  # orbax checkpoints and resume
    return config
