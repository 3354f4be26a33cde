"""Evaluation: perplexity / bits per byte, zero-shot multiple choice, needle-in-a-haystack,
continual learning, and the paper-style results tables. See `experiments/evaluate.py`."""
