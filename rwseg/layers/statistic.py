"""The variable type of the constant dataset statistics a layer stores (e.g. the dilated
affinity layer's neighbour-category frequencies)."""

from __future__ import annotations

from flax import nnx

__all__ = ["Statistic"]


class Statistic(nnx.Variable):
    """A constant dataset statistic stored with the model (not trained, but checkpointed)."""
