"""SPN model: the backbone + :class:`rwseg.layers.SpatialPropagation` on its 1/8 logits.

Liu et al., "Learning Affinity via Spatial Propagation Networks" (eq. 5 three-way
propagation, §3.3 four directions): a guidance network on the image produces, for each
of 4 directions, 3 gates per channel of the coarse map; the propagation refines the
upsampled coarse logits.

Config ``config.spn``: ``layer`` (the arguments of :class:`rwseg.layers.SpatialPropagation`:
``guidance_channels``, ``guidance_depth`` (3x3 convs), ``downsample`` (propagation at
H/f x W/f; 1 = full resolution), ``merge``, ``implementation``, ``colour_sigma_init`` and
``colour_gate_init``: the colour-kernel term of the gates, on the RGB image), ``aux_weight``
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
from rwseg.layers.grid import upsample
from rwseg.models.base import IMAGE_CHANNELS, Segmenter, feature_channels, stem_channels
from rwseg.models.common import cross_entropy

__all__ = ["SPNModel", "GUIDANCE_INPUTS", "parse_guidance_input", "guidance_channels"]

GUIDANCE_INPUTS = ("image", "stem", "features")


def parse_guidance_input(spec) -> tuple[str, ...]:
    """The maps the SPN guidance network sees.

    Args:
      spec: comma-separated names of :data:`GUIDANCE_INPUTS`, e.g. ``"image,stem"``.

    Returns:
      The names as a tuple, e.g. ``("image", "stem")``.

    Raises:
      ValueError: not distinct names of :data:`GUIDANCE_INPUTS` (naming ``spn.guidance_input``).
    """
    names = tuple(n.strip() for n in spec.split(",") if n.strip()) if isinstance(spec, str) else ()
    if not names or any(n not in GUIDANCE_INPUTS for n in names) or len(set(names)) != len(names):
        raise ValueError(f"spn.guidance_input: expected distinct comma-separated names from {GUIDANCE_INPUTS}, "
                         f"got {spec!r}")
    return names


def guidance_channels(config) -> int:
    """The channels of the guidance network's input.

    Args:
      config: a training config (``config.spn.guidance_input``, ``config.model``).

    Returns:
      The sum of the channels of the ``guidance_input`` maps.
    """
    channels = {"image": IMAGE_CHANNELS, "stem": stem_channels(config), "features": feature_channels(config)}
    return sum(channels[n] for n in parse_guidance_input(config.spn.guidance_input))


class SPNModel(Segmenter):
    """The backbone + :class:`rwseg.layers.SpatialPropagation` on its 1/8 logits.

    Constructed as :class:`rwseg.models.base.Segmenter` (``config.spn``: module docstring).
    """

    LAYER = SpatialPropagation
    SUPPLIED = {"norm": lambda config: config.model.norm, "image_channels": guidance_channels}

    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
        super().__init__(config, num_classes, rngs=rngs)
        c = config.spn
        self.aux_weight = float(c.aux_weight)
        self.guidance_input = parse_guidance_input(c.guidance_input)

    def guidance(self, images, out):
        """The guidance network's input: the ``guidance_input`` maps concatenated.

        Args:
          images: (B, H, W, 3) float.
          out: the backbone's outputs on ``images`` (``stem``, ``features``).

        Returns:
          (B, H, W, C), C the layer's ``image_channels``.
        """
        size = images.shape[1:3]
        maps = {"image": lambda: images, "stem": lambda: out["stem"],
                "features": lambda: upsample(out["features"], size, self.backbone.grid(size))}
        return jnp.concatenate([maps[n]() for n in self.guidance_input], axis=-1)

    def refine(self, images, *, return_info: bool = False):
        """The refined and the coarse scores.

        Args:
          images: (B, H, W, 3) float.
          return_info: also return the layer's :class:`rwseg.layers.RefinementInfo`.

        Returns:
          ``(refined, coarse)``, both (B, H, W, K) (``(refined, coarse, info)`` with ``return_info``).
        """
        size = images.shape[1:3]
        out, src = self.backbone(images), self.backbone.grid(size)
        refined, info = self.refinement(out["logits"], self.guidance(images, out), colour=images, logits_grid=src,
                                        return_info=True)
        coarse = upsample(out["logits"], size, src)
        return (refined, coarse, info) if return_info else (refined, coarse)

    def loss(self, batch, step):
        """Cross-entropy of the refined scores + ``aux_weight`` x that of the coarse ones; logs ``ce``,
        ``ce_coarse`` (arguments and returns: :meth:`rwseg.models.base.Segmenter.loss`).
        """
        refined, coarse = self.refine(batch["image"])
        ce = cross_entropy(refined, batch["label"])
        aux = cross_entropy(coarse, batch["label"])
        return ce + self.aux_weight * aux, {"ce": ce, "ce_coarse": aux}

    def infer(self, images):
        """The refined scores (exact propagation, no solve) and the layer's diagnostics
        (arguments and returns: :meth:`rwseg.models.base.Segmenter.infer`).
        """
        refined, _, info = self.refine(images, return_info=True)
        return refined, info.stats()
