"""The interface every rwseg model implements, and the baseline.

A model is an ``nnx.Module`` holding parameters only (plus constant dataset
statistics where a method needs them, as :class:`Statistic` variables). It exposes

* ``loss(batch, step) -> (scalar, dict of scalars)`` — the training objective on a
  batch dict from ``rwseg.data.make_batches`` (``image`` (B, H, W, 3) float32,
  ``label`` (B, H, W) int32, optionally ``scribbles``); ``step`` is the (traced)
  global step, for schedules inside the loss (GCRF pretraining);
* ``predict(images, return_info=False) -> (B, H, W, num_classes)`` — full-resolution
  class scores used for evaluation (argmax = prediction); with ``return_info=True``
  also the solver diagnostics of :func:`solver_stats` (how many per-example solves ran
  and how many did not converge), so that a non-converged solve is never silent.
  Subclasses implement ``infer(images) -> (scores, diagnostics)``.

Per-example solvers are batched with :func:`rwseg.models.device_local.map_examples`
(``vmap``, device-local under a mesh) rather than a bare ``jax.vmap``.

The maths stays in the operator modules (rwseg.rwn, rwseg.spn, ...) and their
refinement layers (:mod:`rwseg.layers`); a method's model is the backbone plus its layer.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from rwseg.models.backbone import upsample
from rwseg.models.common import cross_entropy

__all__ = ["Statistic", "Segmenter", "Baseline", "solver_stats", "no_solves"]


class Statistic(nnx.Variable):
    """A constant dataset statistic stored with the model (not trained, but checkpointed)."""


def solver_stats(converged, *outputs) -> dict:
    """Diagnostics of one solve per example: ``{"solves": (B,) int32, "nonconverged": (B,) int32}``.

    converged: (B, ...) bool, the solver's per-right-hand-side flags (e.g.
    ``SolveInfo.converged`` of a vmapped solve); outputs: (B, ...) arrays of the solve.
    An example counts as non-converged when any flag is False or any output entry is
    not finite (a NaN result is never reported as converged). The dict of
    :meth:`rwseg.layers.RefinementInfo.stats`, which the layers' infos give directly.
    """
    from rwseg.layers.info import solved  # rwseg.layers builds on this module

    b = converged.shape[0]
    zeros = jnp.zeros((b,), jnp.int32)
    return solved(converged, zeros, zeros, *outputs).stats()


def no_solves(batch_size: int) -> dict:
    """The diagnostics of a prediction that runs no solver (zero solves)."""
    zeros = jnp.zeros((batch_size,), jnp.int32)
    return {"solves": zeros, "nonconverged": zeros}


class Segmenter(nnx.Module):
    """Base class: owns the backbone built from ``config.model`` (:func:`rwseg.models.backbones.build_backbone`)."""

    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
        from rwseg.models.backbones import build_backbone  # lazy: the backbones import this module

        self.num_classes = num_classes
        self.backbone = build_backbone(config.model, num_classes, rngs=rngs)  # config.model.backbone

    def coarse_scores(self, images):
        """Backbone logits bilinearly upsampled to the image size: (B, H, W, K)."""
        return self.coarse_scores_from(self.backbone(images), images)

    def coarse_scores_from(self, out, images):
        """:meth:`coarse_scores` from the backbone's outputs ``out`` on ``images``."""
        return upsample(out["logits"], images.shape[1:3], self.backbone.grid(images.shape[1:3]))

    def loss(self, batch, step):
        raise NotImplementedError

    def infer(self, images):
        """(scores (B, H, W, K), diagnostics of :func:`solver_stats` / :func:`no_solves`)."""
        raise NotImplementedError

    def predict(self, images, *, return_info: bool = False):
        """Class scores (B, H, W, K) for images (B, H, W, 3); ``return_info``: also the diagnostics."""
        scores, info = self.infer(images)
        return (scores, info) if return_info else scores


class Baseline(Segmenter):
    """Backbone + bilinear upsampling of the 1/8 logits; softmax cross-entropy."""

    def loss(self, batch, step):
        logits = self.coarse_scores(batch["image"])
        ce = cross_entropy(logits, batch["label"])
        return ce, {"ce": ce}

    def infer(self, images):
        return self.coarse_scores(images), no_solves(images.shape[0])
