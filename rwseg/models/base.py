"""The interface every rwseg model implements, and the baseline.

A model is an ``nnx.Module`` holding parameters only (plus constant dataset
statistics where a method needs them, as :class:`Statistic` variables). It exposes

* ``loss(batch, step) -> (scalar, dict of scalars)`` — the training objective on a
  batch dict from ``rwseg.data.make_batches`` (``image`` (B, H, W, 3) float32,
  ``label`` (B, H, W) int32, optionally ``scribbles``); ``step`` is the (traced)
  global step, for schedules inside the loss (GCRF pretraining);
* ``predict(images) -> (B, H, W, num_classes)`` — full-resolution class scores used
  for evaluation (argmax = prediction).

The maths stays in the operator modules (rwseg.rwn, rwseg.spn, ...); models only
produce their inputs and batch them with ``jax.vmap``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from rwseg.models.backbone import Backbone, upsample
from rwseg.models.common import cross_entropy

__all__ = ["Statistic", "Segmenter", "Baseline"]


class Statistic(nnx.Variable):
    """A constant dataset statistic stored with the model (not trained, but checkpointed)."""


class Segmenter(nnx.Module):
    """Base class: owns the backbone built from ``config.model``."""

    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
        m = config.model
        self.num_classes = num_classes
        self.backbone = Backbone(num_classes, width=m.width, depth=m.depth, aspp_rates=tuple(m.aspp_rates),
                                 features=m.features, norm=m.norm, rngs=rngs)

    def coarse_scores(self, images):
        """Backbone logits bilinearly upsampled to the image size: (B, H, W, K)."""
        out = self.backbone(images)
        return upsample(out["logits"], images.shape[1:3], self.backbone.grid(images.shape[1:3]))

    def loss(self, batch, step):
        raise NotImplementedError

    def predict(self, images):
        raise NotImplementedError


class Baseline(Segmenter):
    """Backbone + bilinear upsampling of the 1/8 logits; softmax cross-entropy."""

    def loss(self, batch, step):
        logits = self.coarse_scores(batch["image"])
        ce = cross_entropy(logits, batch["label"])
        return ce, {"ce": ce}

    def predict(self, images):
        return self.coarse_scores(images)
