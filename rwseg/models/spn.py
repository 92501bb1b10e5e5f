"""SPN refinement model (seed 002, eq. 5 three-way propagation, §3.3 four directions): a guidance network on the image produces, for each
of 4 directions, 3 gates per channel of the coarse map; the three-way spatial
propagation (:func:`rwseg.spn.spn`, node-wise max merge) refines the upsampled coarse
logits.

Config ``config.spn``: ``width`` (guidance channels), ``depth`` (3x3 convs),
``downsample`` (propagation at H/f x W/f; 1 = full resolution), ``aux_weight``
(weight of the coarse cross-entropy added to the refined one; the paper trains SPN on
top of a fixed network, here both train jointly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rwseg import spn as spn_ops
from rwseg.models.backbone import ConvBlock, pooled_grid, upsample
from rwseg.models.base import Segmenter, no_solves
from rwseg.models.common import avg_pool, cross_entropy

__all__ = ["SPNModel"]

NUM_DIRECTIONS, NUM_GATES = 4, 3


class SPNModel(Segmenter):
    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
        super().__init__(config, num_classes, rngs=rngs)
        c = config.spn
        self.downsample = int(c.downsample)
        self.aux_weight = float(c.aux_weight)
        blocks, cin = [], 3
        for _ in range(c.depth):
            blocks.append(ConvBlock(cin, c.width, norm=config.model.norm, rngs=rngs))
            cin = c.width
        self.guidance = nnx.List(blocks)
        self.gates = nnx.Conv(cin, NUM_DIRECTIONS * NUM_GATES * num_classes, (3, 3),
                              kernel_init=nnx.initializers.normal(1e-3), rngs=rngs)

    def _gates(self, images):
        """(B, h, w, 3) -> stabilised gates (B, 4, h, w, K, 3)."""
        x = images
        for block in self.guidance:
            x = block(x)
        g = self.gates(x)
        b, h, w, _ = g.shape
        g = g.reshape(b, h, w, NUM_DIRECTIONS, self.num_classes, NUM_GATES)
        g = jnp.moveaxis(g, 3, 1)
        return spn_ops.stabilize(g)

    def refine(self, images):
        """Returns (refined, coarse) scores, both (B, H, W, K)."""
        size = images.shape[1:3]
        logits, src = self.backbone(images)["logits"], self.backbone.grid(size)
        coarse = upsample(logits, size, src)
        small = avg_pool(images, self.downsample)
        grid = pooled_grid(self.downsample)
        # straight from the 1/8 logits to the propagation grid (one resampling)
        x = upsample(logits, small.shape[1:3], src, grid) if self.downsample > 1 else coarse
        refined = jax.vmap(spn_ops.spn)(x, self._gates(small))
        if self.downsample > 1:
            refined = upsample(refined, size, grid)
        return refined, coarse

    def loss(self, batch, step):
        refined, coarse = self.refine(batch["image"])
        ce = cross_entropy(refined, batch["label"])
        aux = cross_entropy(coarse, batch["label"])
        return ce + self.aux_weight * aux, {"ce": ce, "ce_coarse": aux}

    def infer(self, images):
        return self.refine(images)[0], no_solves(images.shape[0])
