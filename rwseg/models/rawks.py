"""RAWKS model: the backbone (segmentation network) + :class:`rwseg.layers.RandomWalkLabelPropagation`.

Vernaza & Chandraker, "Learning Random-Walk Label Propagation for Weakly-Supervised
Semantic Segmentation": a boundary network and a segmentation network trained from
scribbles with the uncertainty-weighted loss (eq. 11).

Training: the boundary network gives ``B >= 0`` (softplus, clamped at ``max_boundary``)
at ``H / downsample``; the scribbles (``batch["scribbles"]``, -1 = unlabelled; thin
strokes are kept by :func:`rwseg.models.common.subsample_scribbles`) seed the random
walk whose hitting probabilities P (:func:`rwseg.rawks.hitting_probabilities`, one
sparse solve per image, implicit gradient into B) supervise the segmentation network's
Q through :func:`rwseg.rawks.rawks_loss`. The dense labels are never used in training.

``config.freeze_method = True`` (with ``init_from`` a finished RAWKS run and ``init_params =
"all"``): the paper's "train P, Q, then Q" stage: the boundary network stays fixed and P is a
constant target (no adjoint solve), so only Q trains (Table 2: 57.1 -> 59.5 mIoU on VOC).

Evaluation: Q only (``predict``), on validation images; :meth:`RAWKSModel.propagate`
gives P on (training) images with scribbles, to measure the label propagation itself.

Config ``config.rawks``: ``width``, ``depth`` (boundary network), ``downsample``,
``alpha`` (entropy temperature of the uncertainty weights), ``max_boundary``, ``tol``,
``max_iters``, ``targets`` (``"soft"``: eq. 11; ``"hard"``: cross-entropy on argmax P, a
diagnostic for the frozen stage, see :func:`rwseg.rawks.rawks_loss`).
"""

from __future__ import annotations

from flax import nnx

from rwseg.layers import RandomWalkLabelPropagation
from rwseg.models.base import Segmenter, no_solves

__all__ = ["RAWKSModel"]


class RAWKSModel(Segmenter):
    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
        super().__init__(config, num_classes, rngs=rngs)
        c = config.rawks
        self.refinement = RandomWalkLabelPropagation(
            num_classes, boundary_channels=int(c.width), boundary_depth=int(c.depth), downsample=int(c.downsample),
            temperature=float(c.alpha), max_boundary=float(c.max_boundary), tol=float(c.tol),
            max_iters=int(c.max_iters), norm=config.model.norm, rngs=rngs)
        self.fixed_targets = bool(config.get("freeze_method", False))
        self.targets = str(c.get("targets", "soft"))

    def boundary(self, images):
        """B (B, H/f, W/f) >= 0 from images (B, H, W, 3)."""
        return self.refinement.boundary(images)

    def propagate(self, images, scribbles, *, return_info: bool = False):
        """P (B, H/f, W/f, K): hitting probabilities of the scribbles (eq. 5-8).

        One refined CG solve per image, device-local under a mesh
        (:func:`rwseg.models.device_local.map_examples`). ``return_info``: also the
        diagnostics of :func:`rwseg.models.base.solver_stats`.
        """
        if not return_info:
            return self.refinement(images, scribbles)
        p, info = self.refinement(images, scribbles, return_info=True)
        return p, info.stats()

    def loss(self, batch, step):
        images = batch["image"]
        logits = self.backbone(images)["logits"]
        loss = self.refinement.loss(logits, images, batch["scribbles"], logits_grid=self.backbone.grid(images.shape[1:3]),
                                    fixed_targets=self.fixed_targets, targets=self.targets)
        return loss, {"rawks": loss}

    def infer(self, images):
        return self.coarse_scores(images), no_solves(images.shape[0])
