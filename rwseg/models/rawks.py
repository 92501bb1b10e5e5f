"""RAWKS model: the backbone (segmentation network) + :class:`rwseg.layers.RandomWalkLabelPropagation`.

Vernaza & Chandraker, "Learning Random-Walk Label Propagation for Weakly-Supervised
Semantic Segmentation": a boundary network and a segmentation network trained from
scribbles with the uncertainty-weighted loss (eq. 11).

Training: the boundary network gives ``B >= 0`` (softplus, clamped at ``max_boundary``)
at ``H / downsample``; the scribbles (``batch["scribbles"]``, -1 = unlabelled; thin
strokes are kept by :func:`rwseg.layers.grid.subsample_scribbles`) seed the random
walk whose hitting probabilities P (:func:`rwseg.rawks.hitting_probabilities`, one
sparse solve per image, implicit gradient into B) supervise the segmentation network's
Q through :func:`rwseg.rawks.rawks_loss`. The dense labels are never used in training.

``config.freeze_method = True`` (with ``init_from`` a finished RAWKS run and ``init_params =
"all"``): the paper's "train P, Q, then Q" stage: the boundary network stays fixed and P is a
constant target (no adjoint solve), so only Q trains (Table 2: 57.1 -> 59.5 mIoU on VOC).

Evaluation: Q only (``predict``), on validation images; :meth:`RAWKSModel.targets` gives
P and its uncertainty weights on (training) images with scribbles, to measure the label
propagation itself (:func:`rwseg.train.evaluate.evaluate_propagation`).

Config ``config.rawks``: ``layer`` (the arguments of
:class:`rwseg.layers.RandomWalkLabelPropagation`: ``boundary_channels``, ``boundary_depth``
(boundary network), ``downsample``, ``temperature`` (entropy temperature of the
uncertainty weights), ``max_boundary``, ``tol``, ``max_iters``), and ``targets``
(``"soft"``: eq. 11; ``"hard"``: cross-entropy on argmax P, a diagnostic for the frozen
stage, see :func:`rwseg.rawks.rawks_loss`).
"""

from __future__ import annotations

import jax
from flax import nnx

from rwseg import rawks
from rwseg.layers import RandomWalkLabelPropagation
from rwseg.layers.grid import pooled_grid, upsample
from rwseg.models.base import IMAGE_CHANNELS, Segmenter, no_solves

__all__ = ["RAWKSModel"]


class RAWKSModel(Segmenter):
    """The backbone (the segmentation network Q) + :class:`rwseg.layers.RandomWalkLabelPropagation`.

    Constructed as :class:`rwseg.models.base.Segmenter` (``config.rawks``: module docstring;
    ``config.freeze_method`` makes P a constant target).
    """

    LAYER = RandomWalkLabelPropagation
    SUPPLIED = {"norm": lambda config: config.model.norm, "image_channels": lambda config: IMAGE_CHANNELS}

    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
        super().__init__(config, num_classes, rngs=rngs)
        self.fixed_targets = bool(config.freeze_method)
        self.target_kind = str(config.rawks.targets)

    def boundary(self, images):
        """The boundary network's output.

        Args:
          images: (B, H, W, 3) float.

        Returns:
          B: (B, H/f, W/f) >= 0.
        """
        return self.refinement.boundary(images)

    def propagate(self, images, scribbles, *, return_info: bool = False):
        """Hitting probabilities of the scribbles (eq. 5-8), one refined CG solve per image,
        device-local under a mesh (:func:`rwseg.layers.device_local.map_examples`).

        Args:
          images: (B, H, W, 3) float.
          scribbles: (B, H, W) int, -1 = unlabelled.
          return_info: also the diagnostics of :func:`rwseg.models.base.solver_stats`.

        Returns:
          P (B, H/f, W/f, K) on the propagation grid (``(P, diagnostics)`` with ``return_info``).
        """
        if not return_info:
            return self.refinement(images, scribbles)
        p, info = self.refinement(images, scribbles, return_info=True)
        return p, info.stats()

    def targets(self, images, scribbles):
        """The targets Q trains from, at image resolution: P and its uncertainty weights (eq. 11).

        Args:
          images: (B, H, W, 3) float.
          scribbles: (B, H, W) int, -1 = unlabelled.

        Returns:
          ``(P (B, H, W, K), w (B, H, W), diagnostics)``: P and ``w = exp(-temperature H(P))``
          computed on the propagation grid and bilinearly upsampled from it.
        """
        p, info = self.propagate(images, scribbles, return_info=True)
        temperature = self.refinement.temperature
        w = jax.vmap(lambda pp: rawks.uncertainty_weights(pp, temperature=temperature))(p)
        size, grid = images.shape[1:3], pooled_grid(self.refinement.downsample)  # P lies on the walk grid
        return upsample(p, size, grid), upsample(w[..., None], size, grid)[..., 0], info

    def loss(self, batch, step):
        """The uncertainty-weighted loss of eq. 11 of Q against P (a constant with ``freeze_method``),
        from ``batch["scribbles"]`` only; logs ``rawks`` (arguments and returns: :meth:`rwseg.models.base.Segmenter.loss`).
        """
        images = batch["image"]
        logits = self.backbone(images)["logits"]
        loss = self.refinement.loss(logits, images, batch["scribbles"], logits_grid=self.backbone.grid(images.shape[1:3]),
                                    fixed_targets=self.fixed_targets, targets=self.target_kind)
        return loss, {"rawks": loss}

    def infer(self, images):
        """Q's scores; no solver runs at evaluation (P is a training-time module)
        (arguments and returns: :meth:`rwseg.models.base.Segmenter.infer`).
        """
        return self.coarse_scores(images), no_solves(images.shape[0])
