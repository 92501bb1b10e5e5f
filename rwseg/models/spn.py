"""SPN model: the backbone + :class:`rwseg.layers.SpatialPropagation` on its 1/8 logits.

Liu et al., "Learning Affinity via Spatial Propagation Networks" (eq. 5 three-way
propagation, §3.3 four directions): a guidance network on the image produces, for each
of 4 directions, 3 gates per channel of the coarse map; the propagation refines the
upsampled coarse logits.

Config ``config.spn``: ``width`` (guidance channels), ``depth`` (3x3 convs),
``downsample`` (propagation at H/f x W/f; 1 = full resolution), ``aux_weight``
(weight of the coarse cross-entropy added to the refined one; the paper trains SPN on
top of a fixed network, here both train jointly).
"""

from __future__ import annotations

from flax import nnx

from rwseg.layers import SpatialPropagation
from rwseg.models.backbone import upsample
from rwseg.models.base import Segmenter
from rwseg.models.common import cross_entropy

__all__ = ["SPNModel"]


class SPNModel(Segmenter):
    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
        super().__init__(config, num_classes, rngs=rngs)
        c = config.spn
        self.aux_weight = float(c.aux_weight)
        self.refinement = SpatialPropagation(num_classes, guidance_channels=int(c.width), guidance_depth=int(c.depth),
                                             downsample=int(c.downsample), norm=config.model.norm, rngs=rngs)

    def refine(self, images, *, return_info: bool = False):
        """Returns (refined, coarse) scores, both (B, H, W, K) (and the layer's info)."""
        size = images.shape[1:3]
        logits, src = self.backbone(images)["logits"], self.backbone.grid(size)
        refined, info = self.refinement(logits, images, logits_grid=src, return_info=True)
        coarse = upsample(logits, size, src)
        return (refined, coarse, info) if return_info else (refined, coarse)

    def loss(self, batch, step):
        refined, coarse = self.refine(batch["image"])
        ce = cross_entropy(refined, batch["label"])
        aux = cross_entropy(coarse, batch["label"])
        return ce + self.aux_weight * aux, {"ce": ce, "ce_coarse": aux}

    def infer(self, images):
        refined, _, info = self.refine(images, return_info=True)
        return refined, info.stats()
