"""Evaluation: perplexity / bits per byte, zero-shot multiple choice, needle-in-a-haystack,
continual learning, and the paper-style results tables. `suites` runs them over a model and
`workdir` over a training run's checkpoint, for `experiments/evaluate.py`."""
