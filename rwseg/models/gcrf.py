"""GCRF model: the backbone + :class:`rwseg.layers.GaussianCRF` on its logits.

Vemulapalli et al., "Gaussian Conditional Random Field Network for Semantic
Segmentation" (CVPR 2016). Unary: softmax of the backbone logits (r).
Pairwise: a 1x1 conv over the decoder features and the image gives pixel features z;
``filters`` (D, M) and the compatibility parameter ``r`` (K, K, ``C = R R^T``) are
learned. GMF runs at ``H / crf_downsample`` (the paper: 1/8) and its output is
bilinearly upsampled.

Training: ``num_layers`` unrolled GMF layers (the paper's 5), the margin loss (eq. 6)
plus ``aux_weight`` x cross-entropy on the unary logits (the paper pretrains the unary
network instead); during the first ``pretrain_steps`` steps the pairwise pretraining
loss (eq. 7) is added with weight ``pretrain_weight``. Evaluation: GMF to the tolerance
``tol`` (``lax.while_loop``).

Config ``config.gcrf``: ``radius``, ``crf_downsample``, ``features`` (D), ``filters`` (M,
0 = number of classes), ``num_layers``, ``tol``, ``max_layers``, ``margin``,
``aux_weight``, ``pretrain_steps``, ``pretrain_weight``, ``compat_init``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from rwseg.layers import GaussianCRF
from rwseg.layers._inputs import to_image, to_working_grid
from rwseg.models.base import Segmenter
from rwseg.models.common import cross_entropy

__all__ = ["GCRFModel"]


class GCRFModel(Segmenter):
    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
        super().__init__(config, num_classes, rngs=rngs)
        c = config.gcrf
        self.aux_weight = float(c.aux_weight)
        self.pretrain_steps, self.pretrain_weight = int(c.pretrain_steps), float(c.pretrain_weight)
        self.refinement = GaussianCRF(
            num_classes, feature_channels=self.backbone.num_features, embedding_channels=int(c.features),
            num_filters=int(c.filters), radius=int(c.radius), downsample=int(c.crf_downsample),
            num_steps=int(c.num_layers), tol=float(c.tol), max_iters=int(c.max_layers), margin=float(c.margin),
            compat_init=float(c.compat_init), rngs=rngs)

    def _crf(self, images, out, **kw):
        grid = self.backbone.grid(images.shape[1:3])
        return self.refinement(out["logits"], images, out["features"], logits_grid=grid, features_grid=grid, **kw)

    def loss(self, batch, step):
        images, labels = batch["image"], batch["label"]
        out = self.backbone(images)
        size, grid, f = images.shape[1:3], self.backbone.grid(images.shape[1:3]), self.refinement.downsample
        sim = self.refinement.similarity(images, out["features"], features_grid=grid)  # shared by GMF and eq. 7
        margin = self.refinement.margin_loss(self._crf(images, out, train=True, similarity=sim), labels)
        # the unary logits as GMF sees them (on its grid), upsampled
        aux = cross_entropy(to_image(to_working_grid(out["logits"], size, f, grid), size, f), labels)
        pre = self.refinement.pretrain_loss(images, labels, similarity=sim)
        pre_w = jnp.where(step < self.pretrain_steps, self.pretrain_weight, 0.0).astype(margin.dtype)
        return margin + self.aux_weight * aux + pre_w * pre, {"margin": margin, "ce_unary": aux, "pretrain": pre}

    def infer(self, images):
        y, info = self._crf(images, self.backbone(images), return_info=True)
        return y, info.stats()
