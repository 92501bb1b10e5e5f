"""SPN model: the backbone + :class:`rwseg.layers.SpatialPropagation` on its 1/8 logits.

Liu et al., "Learning Affinity via Spatial Propagation Networks" (eq. 5 three-way
propagation, §3.3 four directions): a guidance network on the image produces, for each
of 4 directions, 3 gates per channel of the coarse map; the propagation refines the
upsampled coarse logits.

Config ``config.spn``: ``width`` (guidance channels), ``depth`` (3x3 convs),
``downsample`` (propagation at H/f x W/f; 1 = full resolution), ``aux_weight``
(weight of the coarse cross-entropy added to the refined one; the paper trains SPN on
top of a fixed network, here both train jointly), ``guidance_input`` (what the guidance
network sees, comma-separated from :data:`GUIDANCE_INPUTS`: ``"image"`` is the paper's
RGB; ``"stem"`` adds the backbone's full-resolution first-layer features and
``"features"`` its 1/8 decoder features upsampled, the context the paper's deep VGG
guidance network computes itself; default ``"image"``).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from rwseg.layers import SpatialPropagation
from rwseg.models.backbone import upsample
from rwseg.models.base import Segmenter
from rwseg.models.common import cross_entropy

__all__ = ["SPNModel", "GUIDANCE_INPUTS", "parse_guidance_input"]

GUIDANCE_INPUTS = ("image", "stem", "features")


def parse_guidance_input(spec) -> tuple[str, ...]:
    """``"image,stem"`` -> ``("image", "stem")``; ValueError unless distinct names of :data:`GUIDANCE_INPUTS`."""
    names = tuple(n.strip() for n in spec.split(",") if n.strip()) if isinstance(spec, str) else ()
    if not names or any(n not in GUIDANCE_INPUTS for n in names) or len(set(names)) != len(names):
        raise ValueError(f"spn.guidance_input: expected distinct comma-separated names from {GUIDANCE_INPUTS}, "
                         f"got {spec!r}")
    return names


class SPNModel(Segmenter):
    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
        super().__init__(config, num_classes, rngs=rngs)
        c = config.spn
        self.aux_weight = float(c.aux_weight)
        self.guidance_input = parse_guidance_input(c.get("guidance_input", "image"))
        channels = {"image": 3, "stem": self.backbone.stem_channels, "features": self.backbone.num_features}
        self.refinement = SpatialPropagation(num_classes, guidance_channels=int(c.width), guidance_depth=int(c.depth),
                                             downsample=int(c.downsample), norm=config.model.norm,
                                             image_channels=sum(channels[n] for n in self.guidance_input), rngs=rngs)

    def guidance(self, images, out):
        """The guidance network's input: (B, H, W, C), the ``guidance_input`` maps concatenated."""
        size = images.shape[1:3]
        maps = {"image": lambda: images, "stem": lambda: out["stem"],
                "features": lambda: upsample(out["features"], size, self.backbone.grid(size))}
        return jnp.concatenate([maps[n]() for n in self.guidance_input], axis=-1)

    def refine(self, images, *, return_info: bool = False):
        """Returns (refined, coarse) scores, both (B, H, W, K) (and the layer's info)."""
        size = images.shape[1:3]
        out, src = self.backbone(images), self.backbone.grid(size)
        refined, info = self.refinement(out["logits"], self.guidance(images, out), logits_grid=src, return_info=True)
        coarse = upsample(out["logits"], size, src)
        return (refined, coarse, info) if return_info else (refined, coarse)

    def loss(self, batch, step):
        refined, coarse = self.refine(batch["image"])
        ce = cross_entropy(refined, batch["label"])
        aux = cross_entropy(coarse, batch["label"])
        return ce + self.aux_weight * aux, {"ce": ce, "ce_coarse": aux}

    def infer(self, images):
        refined, _, info = self.refine(images, return_info=True)
        return refined, info.stats()
