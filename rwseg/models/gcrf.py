"""GCRF model: the backbone + :class:`rwseg.layers.GaussianCRF` on its logits.

Vemulapalli et al., "Gaussian Conditional Random Field Network for Semantic
Segmentation" (CVPR 2016). Unary: softmax of the backbone logits (r).
Pairwise: a 1x1 conv over the decoder features and the image gives pixel features z;
``filters`` (D, M) and the compatibility parameter ``r`` (K, K, ``C = R R^T``) are
learned. GMF runs at ``H / downsample`` (the paper: 1/8) and its output is
bilinearly upsampled.

Training: ``num_steps`` unrolled GMF layers (the paper's 5), the margin loss (eq. 6)
plus ``aux_weight`` x cross-entropy on the unary logits (the paper pretrains the unary
network instead); during the first ``pretrain_steps`` steps the pairwise pretraining
loss (eq. 7) is added with weight ``pretrain_weight``. Evaluation: GMF to the tolerance
``tol`` (``lax.while_loop``).

Config ``config.gcrf``: ``layer`` (the arguments of :class:`rwseg.layers.GaussianCRF`:
``radius``, ``downsample``, ``embedding_channels`` (D), ``num_filters`` (M, 0 = number of
classes), ``num_steps``, ``tol``, ``max_iters``, ``margin``, ``compat_init``, ``colour_sigma_init``), and
``aux_weight``, ``pretrain_steps``, ``pretrain_weight``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from rwseg.layers import GaussianCRF
from rwseg.layers.grid import to_image, to_working_grid
from rwseg.models.base import IMAGE_CHANNELS, Segmenter, feature_channels, stem_channels
from rwseg.models.common import cross_entropy

__all__ = ["GCRFModel"]


class GCRFModel(Segmenter):
    """The backbone + :class:`rwseg.layers.GaussianCRF` on its logits and decoder features.

    Constructed as :class:`rwseg.models.base.Segmenter` (``config.gcrf``: module docstring).
    """

    LAYER = GaussianCRF
    SUPPLIED = {"feature_channels": feature_channels,
                "image_channels": lambda config: IMAGE_CHANNELS}

    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
        super().__init__(config, num_classes, rngs=rngs)
        c = config.gcrf
        self.aux_weight = float(c.aux_weight)
        self.pretrain_steps, self.pretrain_weight = int(c.pretrain_steps), float(c.pretrain_weight)

    def _crf(self, images, out, **kw):
        grid = self.backbone.grid(images.shape[1:3])
        return self.refinement(out["logits"], images, out["features"], logits_grid=grid, features_grid=grid, **kw)

    def loss(self, batch, step):
        """Margin loss (eq. 6) of unrolled GMF + ``aux_weight`` x the unary cross-entropy, plus
        ``pretrain_weight`` x the pairwise loss (eq. 7) before ``pretrain_steps``; logs ``margin``,
        ``ce_unary``, ``pretrain`` (arguments and returns: :meth:`rwseg.models.base.Segmenter.loss`).
        """
        images, labels = batch["image"], batch["label"]
        out = self.backbone(images)
        size, grid, f = images.shape[1:3], self.backbone.grid(images.shape[1:3]), self.refinement.downsample
        sim = self.refinement.similarity(images, out["features"], features_grid=grid, train=True)  # GMF's and eq. 7's
        margin = self.refinement.margin_loss(self._crf(images, out, train=True, similarity=sim), labels)
        # the unary logits as GMF sees them (on its grid), upsampled
        aux = cross_entropy(to_image(to_working_grid(out["logits"], size, f, grid), size, f), labels)
        pre = self.refinement.pretrain_loss(images, labels, similarity=sim)
        pre_w = jnp.where(step < self.pretrain_steps, self.pretrain_weight, 0.0).astype(margin.dtype)
        return margin + self.aux_weight * aux + pre_w * pre, {"margin": margin, "ce_unary": aux, "pretrain": pre}

    def infer(self, images):
        """GMF to ``tol``, one solve per image (device-local under a mesh), and its diagnostics
        (arguments and returns: :meth:`rwseg.models.base.Segmenter.infer`).
        """
        y, info = self._crf(images, self.backbone(images), return_info=True)
        return y, info.stats()
