"""RWN model: the backbone + :class:`rwseg.layers.RandomWalkRefinement` on its logits.

Bertasius et al., "Convolutional Random Walk Networks for Semantic Image Segmentation".
Affinity branch: features = the normalised image and the backbone's full-resolution
stem features (the paper's RGB + two low-level maps), average-pooled to the walk
resolution ``H / walk_downsample``, per-channel L1 distances on a disk, a 1x1 conv
``theta`` and ``exp``.

Training: one walk step ``y = A f`` on a disk of radius ``train_radius`` (eq. 2), softmax
loss on ``y`` upsampled, plus ``affinity_weight`` x the squared-error affinity loss
(§3.3). Evaluation: the converged walk ``(1 - alpha)(I - alpha A)^-1 f`` on a disk of
radius ``eval_radius`` (eq. 3; symmetric affinities, so CG), solved matrix-free.

Config ``config.rwn``: ``walk_downsample``, ``train_radius``, ``eval_radius``, ``alpha``,
``affinity_weight``, ``theta_init``, ``tol``, ``max_iters``. Radii are in walk pixels
(the paper's R = 40 / 5 at full 321x321 resolution are too large for 64x64 crops).
"""

from __future__ import annotations

from flax import nnx

from rwseg.layers import RandomWalkRefinement
from rwseg.models.base import Segmenter
from rwseg.models.common import cross_entropy

__all__ = ["RWNModel"]


class RWNModel(Segmenter):
    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
        super().__init__(config, num_classes, rngs=rngs)
        c = config.rwn
        self.affinity_weight = float(c.affinity_weight)
        self.refinement = RandomWalkRefinement(
            num_classes, feature_channels=self.backbone.stem_channels, downsample=int(c.walk_downsample),
            train_radius=int(c.train_radius), eval_radius=int(c.eval_radius), alpha=float(c.alpha),
            theta_init=float(c.theta_init), tol=float(c.tol), max_iters=int(c.max_iters), rngs=rngs)

    def _walk(self, images, out, **kw):
        grid = self.backbone.grid(images.shape[1:3])
        return self.refinement(out["logits"], images, out["stem"], logits_grid=grid, **kw)

    def loss(self, batch, step):
        images, labels = batch["image"], batch["label"]
        out = self.backbone(images)
        weights = self.refinement.affinities(images, out["stem"], train=True)  # shared by the walk and its loss
        ce = cross_entropy(self._walk(images, out, train=True, affinities=weights), labels)
        aff = self.refinement.affinity_loss(images, labels, out["stem"], affinities=weights)
        return ce + self.affinity_weight * aff, {"ce": ce, "affinity": aff}

    def infer(self, images):
        """Converged walk (one CG solve per image, device-local under a mesh) and its diagnostics."""
        y, info = self._walk(images, self.backbone(images), return_info=True)
        return y, info.stats()
