"""examples/optim_classifier.py: every nl_jax.optim alias is in its table and trains a few steps."""

import numpy as np

from examples import optim_classifier
from nl_jax import optim


def _aliases():
    """The chained aliases exported by nl_jax.optim: each has a scale_by_<name> transform, except
    muon (scale_by_newton_schulz; newton_schulz itself is the bare iteration)."""
    return {n for n in optim.__all__ if f"scale_by_{n}" in optim.__all__} - {"newton_schulz"} | {"muon"}


def test_every_optimizer_is_listed():
    names = {k.split(" ")[0] for k in optim_classifier.optimizers(10)}
    missing = _aliases() - names
    assert not missing, missing
    assert "optax.adamw" in names


def test_each_optimizer_takes_finite_steps():
    x, y = optim_classifier.make_data(n=256)
    for name, tx in optim_classifier.optimizers(3).items():
        loss, acc = optim_classifier.train(tx, x, y, steps=3)
        assert np.isfinite(loss) and 0.0 <= acc <= 1.0, name

