"""The interface every rwseg model implements, and the baseline.

A model is an ``nnx.Module`` holding parameters only (plus constant dataset
statistics where a method needs them, as :class:`rwseg.layers.statistic.Statistic` variables). It exposes

* ``loss(batch, step) -> (scalar, dict of scalars)`` — the training objective on a
  batch dict from ``rwseg.data.make_batches`` (``image`` (B, H, W, 3) float32,
  ``label`` (B, H, W) int32, optionally ``scribbles``); ``step`` is the (traced)
  global step, for schedules inside the loss (GCRF pretraining);
* ``predict(images, return_info=False) -> (B, H, W, num_classes)`` — full-resolution
  class scores used for evaluation (argmax = prediction); with ``return_info=True``
  also the solver diagnostics of :func:`solver_stats` (how many per-example solves ran
  and how many did not converge), so that a non-converged solve is never silent.
  Subclasses implement ``infer(images) -> (scores, diagnostics)``.

Per-example solvers are batched with :func:`rwseg.layers.device_local.map_examples`
(``vmap``, device-local under a mesh) rather than a bare ``jax.vmap``.

The maths stays in the operator modules (rwseg.rwn, rwseg.spn, ...) and their
refinement layers (:mod:`rwseg.layers`); a method's model is the backbone plus its layer.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from rwseg.layers.grid import upsample
from rwseg.layers.info import solved
from rwseg.models.backbones import backbone_channels, build_backbone
from rwseg.models.common import cross_entropy

__all__ = ["IMAGE_CHANNELS", "stem_channels", "feature_channels", "Segmenter", "Baseline", "solver_stats", "no_solves"]

IMAGE_CHANNELS = 3  # the models' input images are RGB (rwseg.data)


def stem_channels(config) -> int:
    """Channels of the backbone's full-resolution ``stem`` features (any ``config.model.backbone``).

    Args:
      config: a training config.

    Returns:
      ``config.model.width`` on the compact backbone, 64 (conv1) on a ResNet.
    """
    return backbone_channels(config.model)[0]


def feature_channels(config) -> int:
    """Channels of the backbone's ``features`` (any ``config.model.backbone``).

    Args:
      config: a training config.

    Returns:
      ``config.model.features`` on the compact backbone; a ResNet's head width (layer4's
      2048 with the ASPP-v2 head).
    """
    return backbone_channels(config.model)[1]


def solver_stats(converged, *outputs) -> dict:
    """Diagnostics of one solve per example.

    An example counts as non-converged when any flag is False or any output entry is not
    finite (a NaN result is never reported as converged). The dict of
    :meth:`rwseg.layers.RefinementInfo.stats`, which the layers' infos give directly.

    Args:
      converged: (B, ...) bool, the solver's per-right-hand-side flags (e.g.
        ``SolveInfo.converged`` of a vmapped solve).
      *outputs: (B, ...) arrays of the solve.

    Returns:
      ``{"solves": (B,) int32 ones, "nonconverged": (B,) int32}``.
    """
    b = converged.shape[0]
    zeros = jnp.zeros((b,), jnp.int32)
    return solved(converged, zeros, zeros, *outputs).stats()


def no_solves(batch_size: int) -> dict:
    """The diagnostics of a prediction that runs no solver.

    Args:
      batch_size: B.

    Returns:
      ``{"solves": (B,) int32 zeros, "nonconverged": (B,) int32 zeros}``.
    """
    zeros = jnp.zeros((batch_size,), jnp.int32)
    return {"solves": zeros, "nonconverged": zeros}


class Segmenter(nnx.Module):
    """Base class: owns the backbone built from ``config.model``
    (:func:`rwseg.models.backbones.build_backbone`, by ``config.model.backbone``).

    A method's model adds one refinement layer, ``self.refinement``, of the class ``LAYER``
    (of :mod:`rwseg.layers`), built as ``LAYER(num_classes, **config.<method>.layer,
    **supplied_arguments(config), **statistics, rngs=rngs)``: the config's layer section
    holds exactly the layer's arguments, under the layer's names, except those the model
    derives from ``config.model`` (``SUPPLIED``: ``{name: config -> value}``) and the
    dataset statistics (``STATISTICS``, from the model's ``dataset_statistics``).

    Args:
      config: a training config (``config.model``: ``backbone``, then ``width``, ``depth``,
        ``aspp_rates``, ``features``, ``norm`` of :class:`rwseg.models.backbone.Backbone` or the
        section ``resnet`` of :class:`rwseg.models.backbones.ResNet`; the method's
        ``config.<method>``). The layer's channel arguments follow the backbone's
        ``stem_channels`` / ``num_features`` (:func:`stem_channels`, :func:`feature_channels`).
      num_classes: K, channels of the logits.
      rngs: parameter initialisation.
      statistics: the dataset statistics the layer takes (``STATISTICS``), else ``None``.
    """

    LAYER = None  # the method's refinement layer class (None: the baseline)
    SUPPLIED: dict = {}  # layer argument -> its value from the config outside config.<method>.layer
    STATISTICS = frozenset()  # layer arguments given by the dataset statistics

    @classmethod
    def supplied_arguments(cls, config) -> dict:
        """The layer arguments the model derives from outside ``config.<method>.layer``.

        Args:
          config: a training config.

        Returns:
          ``{name: value}`` of ``SUPPLIED``.
        """
        return {name: value(config) for name, value in cls.SUPPLIED.items()}

    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs, statistics: dict | None = None):
        self.num_classes = num_classes
        self.backbone = build_backbone(config.model, num_classes, in_channels=IMAGE_CHANNELS, rngs=rngs)
        built = (self.backbone.stem_channels, self.backbone.num_features)
        assert built == backbone_channels(config.model), (built, backbone_channels(config.model))
        if self.LAYER is not None:
            self.refinement = self.LAYER(num_classes, **config[config.method].layer, **self.supplied_arguments(config),
                                         **(statistics or {}), rngs=rngs)

    def coarse_scores(self, images):
        """The backbone's logits bilinearly upsampled to the images (from the backbone's grid).

        Args:
          images: (B, H, W, 3) float, normalised.

        Returns:
          (B, H, W, K) float scores.
        """
        return self.coarse_scores_from(self.backbone(images), images)

    def coarse_scores_from(self, out, images):
        """:meth:`coarse_scores` from the backbone's outputs already computed on ``images``.

        Args:
          out: the backbone's output dict (``logits`` (B, H/8, W/8, K)).
          images: (B, H, W, 3) float (their size only).

        Returns:
          (B, H, W, K) float scores.
        """
        return upsample(out["logits"], images.shape[1:3], self.backbone.grid(images.shape[1:3]))

    def loss(self, batch, step):
        """The training objective on a batch.

        Args:
          batch: ``{"image": (B, H, W, 3) float32, "label": (B, H, W) int32[, "scribbles": (B, H, W)
            int32]}`` from :func:`rwseg.data.make_batches`.
          step: the (traced) global step, for schedules inside the loss.

        Returns:
          ``(loss scalar, {name: scalar})``: the objective and its terms, logged.
        """
        raise NotImplementedError

    def infer(self, images):
        """Full-resolution class scores and solver diagnostics (implemented by each model).

        Args:
          images: (B, H, W, 3) float, normalised.

        Returns:
          ``(scores (B, H, W, K), diagnostics)``, diagnostics of :func:`solver_stats` /
          :func:`no_solves`.
        """
        raise NotImplementedError

    def predict(self, images, *, return_info: bool = False):
        """Class scores for evaluation (argmax = prediction).

        Args:
          images: (B, H, W, 3) float, normalised.
          return_info: also return the solver diagnostics.

        Returns:
          (B, H, W, K) scores, or ``(scores, diagnostics)`` with ``return_info``.
        """
        scores, info = self.infer(images)
        return (scores, info) if return_info else scores


class Baseline(Segmenter):
    """Backbone + bilinear upsampling of the 1/8 logits; softmax cross-entropy."""

    def loss(self, batch, step):
        """Softmax cross-entropy of the upsampled logits; logs ``ce`` (arguments and returns: :meth:`rwseg.models.base.Segmenter.loss`)."""
        logits = self.coarse_scores(batch["image"])
        ce = cross_entropy(logits, batch["label"])
        return ce, {"ce": ce}

    def infer(self, images):
        """The upsampled logits, no solves (arguments and returns: :meth:`rwseg.models.base.Segmenter.infer`)."""
        return self.coarse_scores(images), no_solves(images.shape[0])
