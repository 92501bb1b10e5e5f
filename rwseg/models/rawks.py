"""RAWKS model (seed 001): a boundary network and a segmentation network trained from
scribbles with the uncertainty-weighted loss (eq. 11).

Training: the boundary network gives ``B >= 0`` (softplus, clamped at ``max_boundary``)
at ``H / downsample``; the scribbles (``batch["scribbles"]``, -1 = unlabelled; thin
strokes are kept by :func:`rwseg.models.common.subsample_scribbles`) seed the random
walk whose hitting probabilities P (:func:`rwseg.rawks.hitting_probabilities`, one
sparse solve per image, implicit gradient into B) supervise the segmentation network's
Q through :func:`rwseg.rawks.rawks_loss`. The dense labels are never used in training.

Evaluation: Q only (``predict``), on validation images; :meth:`RAWKSModel.propagate`
gives P on (training) images with scribbles, to measure the label propagation itself.

Config ``config.rawks``: ``width``, ``depth`` (boundary network), ``downsample``,
``alpha`` (uncertainty weight), ``max_boundary``, ``tol``, ``max_iters``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rwseg import rawks as ops
from rwseg.models.backbone import ConvBlock, pooled_grid, upsample
from rwseg.models.base import Segmenter, no_solves, solver_stats
from rwseg.models.device_local import map_examples
from rwseg.models.common import avg_pool, subsample_scribbles

__all__ = ["RAWKSModel"]


class RAWKSModel(Segmenter):
    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
        super().__init__(config, num_classes, rngs=rngs)
        c = config.rawks
        self.downsample = int(c.downsample)
        self.alpha, self.max_boundary = float(c.alpha), float(c.max_boundary)
        self.tol, self.max_iters = float(c.tol), int(c.max_iters)
        blocks, cin = [], 3
        for _ in range(int(c.depth)):
            blocks.append(ConvBlock(cin, int(c.width), norm=config.model.norm, rngs=rngs))
            cin = int(c.width)
        self.boundary_net = nnx.List(blocks)
        self.boundary_out = nnx.Conv(cin, 1, (3, 3), rngs=rngs)

    def boundary(self, images):
        """B (B, H/f, W/f) >= 0 from images (B, H, W, 3)."""
        x = avg_pool(images, self.downsample)
        for block in self.boundary_net:
            x = block(x)
        b = jax.nn.softplus(self.boundary_out(x)[..., 0])
        return jnp.minimum(b, self.max_boundary)

    def propagate(self, images, scribbles, *, return_info: bool = False):
        """P (B, H/f, W/f, K): hitting probabilities of the scribbles (eq. 5-8).

        One refined CG solve per image, device-local under a mesh
        (:func:`rwseg.models.device_local.map_examples`). ``return_info``: also the
        diagnostics of :func:`rwseg.models.base.solver_stats`.
        """
        b = self.boundary(images)
        seeds = subsample_scribbles(scribbles, self.downsample)

        def hit(bb, s):
            p, info = ops.hitting_probabilities(bb, s, self.num_classes, tol=self.tol, max_iters=self.max_iters,
                                                return_info=True)
            return p, info.solve.converged

        p, converged = map_examples(hit, b, seeds)
        return (p, solver_stats(converged, p)) if return_info else p

    def loss(self, batch, step):
        images = batch["image"]
        p = self.propagate(images, batch["scribbles"])
        logits = upsample(self.backbone(images)["logits"], p.shape[1:3], self.backbone.grid(images.shape[1:3]),
                          pooled_grid(self.downsample))
        loss = jnp.mean(jax.vmap(lambda pp, q: ops.rawks_loss(pp, q, alpha=self.alpha))(p, logits))
        return loss, {"rawks": loss}

    def infer(self, images):
        return self.coarse_scores(images), no_solves(images.shape[0])
