"""Dilated affinity model (Wu et al.): the backbone + :class:`rwseg.layers.DilatedAffinity`.

Training: segmentation cross-entropy + ``beta`` x the reweighted focal affinity loss
(:func:`rwseg.dilated.affinity_loss`), the paper's loss, + ``refined_weight`` x the
cross-entropy of the propagated prediction (not in the paper, 0 by default: it trains the
head through the propagation it is evaluated with, as SPN and GCRF train); evaluation:
affinity propagation refinement of the upsampled class probabilities
(:func:`rwseg.dilated.propagate`). The head is a 1x1
conv on the 1/8 decoder features giving 8·|R| logits, bilinearly upsampled to the
image (with ``use_stem``, the head sees the upsampled decoder features concatenated
with the full-resolution stem features — a DeepLabv3+-style decoder; at 64 px the 1/8
map alone is 8x8 and cannot place boundaries); its bias starts at the dataset prior
(:func:`rwseg.dilated.prior_bias`), which needs the neighbour-category frequencies of
the training labels — computed once by :meth:`DilatedAffinityModel.dataset_statistics`
and stored with the layer.

Config ``config.dilated``: ``layer`` (the arguments of :class:`rwseg.layers.DilatedAffinity`:
``rates`` (pixels at full resolution; ints or (r1, r2) pairs), ``decoder_width`` /
``decoder_depth`` (3x3 blocks before the 1x1 head), ``gamma``, ``lam``, ``mu``,
``num_steps``, ``colour_sigma_init``: the colour term of the affinity logits, on the RGB
image), ``use_stem``, ``beta`` and ``refined_weight``.
"""

from __future__ import annotations

import jax
from flax import nnx

from rwseg.layers import DilatedAffinity
from rwseg.models.base import Segmenter, feature_channels, no_solves, stem_channels
from rwseg.constants import IGNORE_INDEX
from rwseg.models.common import cross_entropy, probability_cross_entropy

__all__ = ["DilatedAffinityModel"]


class DilatedAffinityModel(Segmenter):
    """The backbone + :class:`rwseg.layers.DilatedAffinity` on its decoder (and stem) features.

    Constructed as :class:`rwseg.models.base.Segmenter` (``config.dilated``: module docstring).
      statistics: ``{"frequencies": (|R|, 9)}`` of :meth:`dataset_statistics`.
    """

    LAYER = DilatedAffinity
    SUPPLIED = {"feature_channels": feature_channels,
                "norm": lambda config: config.model.norm,
                "low_level_channels": lambda config: stem_channels(config) if config.dilated.use_stem else 0}
    STATISTICS = frozenset({"frequencies"})

    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs, statistics: dict):
        super().__init__(config, num_classes, rngs=rngs, statistics=statistics)
        c = config.dilated
        self.beta = float(c.beta)
        self.refined_weight = float(c.refined_weight)
        self.use_stem = bool(c.use_stem)

    @staticmethod
    def dataset_statistics(config, label_maps) -> dict:
        """The layer's neighbour-category table from training labels.

        Args:
          config: the training config (``config.dilated.layer.rates``).
          label_maps: (B, H, W) int training labels.

        Returns:
          ``{"frequencies": (|R|, 9) float32}``.
        """
        return {"frequencies": DilatedAffinity.frequencies_from_labels(label_maps, config.dilated.layer.rates,
                                                                       ignore_index=IGNORE_INDEX)}

    def _head_inputs(self, images, out):
        return (out["features"], out["stem"] if self.use_stem else None)

    def loss(self, batch, step):
        """Cross-entropy of the upsampled logits + ``beta`` x the focal affinity loss (eq. 4-5)
        + ``refined_weight`` x the cross-entropy of the propagated probabilities (eq. 6-7; computed
        only when the weight is > 0); logs ``ce``, ``affinity`` and, with the weight, ``ce_refined``
        (arguments and returns: :meth:`rwseg.models.base.Segmenter.loss`).
        """
        images, labels = batch["image"], batch["label"]
        out = self.backbone(images)
        head_inputs = self._head_inputs(images, out)
        grid = self.backbone.grid(images.shape[1:3])
        ce = cross_entropy(self.coarse_scores_from(out, images), labels)
        aff = self.refinement.affinity_logits(images, *head_inputs, features_grid=grid)  # shared by both terms
        # beta 0: the focal loss is logged, not trained on; its backward pass is skipped, not multiplied by 0
        scored = aff if self.beta > 0 else jax.lax.stop_gradient(aff)
        aff_loss = self.refinement.affinity_loss(images, labels, *head_inputs, affinities=scored)
        total, logs = ce + self.beta * aff_loss, {"ce": ce, "affinity": aff_loss}
        if self.refined_weight > 0:
            refined = self.refinement(out["logits"], images, *head_inputs, logits_grid=grid, affinities=aff)
            logs["ce_refined"] = probability_cross_entropy(refined, labels)
            total = total + self.refined_weight * logs["ce_refined"]
        return total, logs

    def infer(self, images):
        """Affinity propagation of the upsampled class probabilities (eq. 6-7), no solves
        (arguments and returns: :meth:`rwseg.models.base.Segmenter.infer`).
        """
        out = self.backbone(images)
        grid = self.backbone.grid(images.shape[1:3])
        probs = self.refinement(out["logits"], images, *self._head_inputs(images, out), logits_grid=grid,
                                features_grid=grid)
        return probs, no_solves(images.shape[0])
