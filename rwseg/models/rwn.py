"""RWN model: the backbone + :class:`rwseg.layers.RandomWalkRefinement` on its logits.

Bertasius et al., "Convolutional Random Walk Networks for Semantic Image Segmentation".
Affinity branch: features = the normalised image and the backbone's full-resolution
stem features (the paper's RGB + two low-level maps), average-pooled to the walk
resolution ``H / downsample``, per-channel L1 distances on a disk, a 1x1 conv
``theta`` and ``exp``.

Training: one walk step ``y = A f`` on a disk of radius ``train_radius`` (eq. 2), softmax
loss on ``y`` upsampled, plus ``affinity_weight`` x the squared-error affinity loss
(§3.3). Evaluation: the converged walk ``(1 - alpha)(I - alpha A)^-1 f`` on a disk of
radius ``eval_radius`` (eq. 3; symmetric affinities, so CG), solved matrix-free.

Config ``config.rwn``: ``layer`` (the arguments of :class:`rwseg.layers.RandomWalkRefinement`:
``downsample``, ``train_radius``, ``eval_radius``, ``eval_rates``, ``alpha``, ``theta_init``,
``feature_theta_init``, ``tol``, ``max_iters``) and ``affinity_weight``. Radii are in walk pixels (the paper's R = 40 / 5
at full 321x321 resolution are too large for 64x64 crops).
"""

from __future__ import annotations

from flax import nnx

from rwseg.layers import RandomWalkRefinement
from rwseg.models.base import IMAGE_CHANNELS, Segmenter, feature_channels, stem_channels
from rwseg.models.common import cross_entropy

__all__ = ["RWNModel"]


class RWNModel(Segmenter):
    """The backbone + :class:`rwseg.layers.RandomWalkRefinement` on its logits (affinities
    from the image and the stem features).

    Constructed as :class:`rwseg.models.base.Segmenter` (``config.rwn``: module docstring).
    """

    LAYER = RandomWalkRefinement
    SUPPLIED = {"feature_channels": stem_channels,
                "image_channels": lambda config: IMAGE_CHANNELS}

    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
        super().__init__(config, num_classes, rngs=rngs)
        self.affinity_weight = float(config.rwn.affinity_weight)

    def _walk(self, images, out, **kw):
        grid = self.backbone.grid(images.shape[1:3])
        return self.refinement(out["logits"], images, out["stem"], logits_grid=grid, **kw)

    def loss(self, batch, step):
        """Cross-entropy of the one-step walk (eq. 2) + ``affinity_weight`` x the affinity loss (§3.3);
        logs ``ce``, ``affinity`` (arguments and returns: :meth:`rwseg.models.base.Segmenter.loss`).
        """
        images, labels = batch["image"], batch["label"]
        out = self.backbone(images)
        weights = self.refinement.affinities(images, out["stem"], train=True)  # shared by the walk and its loss
        ce = cross_entropy(self._walk(images, out, train=True, affinities=weights), labels)
        aff = self.refinement.affinity_loss(images, labels, out["stem"], affinities=weights)
        return ce + self.affinity_weight * aff, {"ce": ce, "affinity": aff}

    def infer(self, images):
        """The converged walk (eq. 3), one CG solve per image (device-local under a mesh), and its
        diagnostics (arguments and returns: :meth:`rwseg.models.base.Segmenter.infer`).
        """
        y, info = self._walk(images, self.backbone(images), return_info=True)
        return y, info.stats()
