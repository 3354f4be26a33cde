"""Checkpoints of other frameworks: `llama` (Hugging Face Llama <-> nl_jax `transformer`)."""
