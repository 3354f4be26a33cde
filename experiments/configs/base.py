"""Base config: every named config is `base.get_config()` plus a few overrides.

Sections so far: `model` (what `nl_jax.models.build_model` reads) and `mesh` (what
`nl_jax.parallel.make_mesh` reads). The trainer adds optim / data / train sections.
Any field can be overridden on the command line: `--config.model.d_model=512`.
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
    """Transformer++ defaults (a 24 x 1024 shape); HOPE / Titans configs add their own fields."""
    return ml_collections.ConfigDict(
        dict(
            name="transformer",  # registry name: nl_jax.models.registry.registered_models()
            vocab_size=32000,  # Llama-2 tokenizer (paper D1); 260 for byte-level tiny configs (259 ids)
            d_model=1024,  # residual stream width
            num_layers=24,  # number of blocks (stacked and scanned)
            num_heads=16,  # query heads
            num_kv_heads=0,  # key/value heads for GQA; 0 means = num_heads (plain MHA)
            head_dim=0,  # per-head width; 0 means d_model // num_heads
            mlp_hidden=2816,  # SwiGLU hidden width (fla: 256-multiple near 8/3 * d_model)
            rope_theta=10000.0,  # RoPE base frequency
            sliding_window=0,  # attention window in tokens (self included); 0 = full causal
            tie_embeddings=False,  # share the input embedding as the output projection
            norm_eps=1e-6,  # RMSNorm epsilon
            dtype="float32",  # compute dtype of matmuls/activations; "bfloat16" on TPU
            param_dtype="float32",  # storage dtype of parameters (float32 master weights, D10)
            scan_layers=True,  # lax.scan over stacked layers (False: python loop, for debugging)
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


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = model_config()  # the model architecture (registry name + its fields)
    config.mesh = mesh_config()  # device mesh layout
    return config
