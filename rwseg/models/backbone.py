"""A compact DeepLab-style backbone in Flax NNX (shared by every method).

Layout: a full-resolution *stem* (one 3x3 conv; its output is the "first-layer
features" RWN's affinity branch uses), a strided encoder down to 1/8 resolution
(three stride-2 stages, ``depth`` extra 3x3 convs each), a small ASPP (parallel dilated
3x3 convs, concatenated, 1x1 projection) and a 1x1 classifier giving 1/8-resolution
logits — the DeepLab recipe (Bertasius et al. §3.1, Wu et al. §4) at laptop size.

Normalisation is GroupNorm or none (``norm="group" | "none"``): no BatchNorm, so a
model has no mutable batch statistics and a data-parallel step is a pure function
of (params, batch) whatever the number of devices.

Inputs are batched ``(B, H, W, 3)``; H and W should be multiples of 8 (other sizes
work, the 1/8 map is then ``ceil(H / 8)``).

Geometry (where the 1/8 cells really are). A stride-2 3x3 'SAME' conv on an even input
pads only bottom/right, so output cell i is centred on input pixel 2i + 1 (integer
pixel coordinates), not on the point 2i + 0.5 between input pixels 2i and 2i + 1 that a
2x2 average pool — or ``jax.image.resize`` with its half-pixel centres — assumes: a
+0.5 input-pixel shift per stage, i.e. ``0.5 + 1 + 2 = +3.5`` full-resolution pixels
down-right after the three stages (odd inputs pad both sides: -0.5 per stage instead).
No choice of 3x3 padding cancels it (+-0.5 +-1 +-2 is never 0), so the convs are left
as they are (parameter shapes unchanged) and the geometry is made explicit instead:
:class:`rwseg.layers.grid.Grid` says where the cells of a map lie in full-resolution pixels,
:func:`encoder_grid` gives the backbone's 1/8 grid for an input size (exactly, per
stage and parity), :func:`rwseg.layers.grid.pooled_grid` the grid of :func:`rwseg.layers.grid.avg_pool`
/ block subsampling, and :func:`rwseg.layers.grid.upsample` — the one resampler every model uses — maps
a map from its grid to another (by default the full-resolution pixels) with
``jax.image.scale_and_translate`` and the compensating translation (edge values
extended outside, as ``jax.image.resize`` does).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from rwseg.layers.convs import ConvBlock
from rwseg.layers.grid import Grid

__all__ = ["Backbone", "encoder_grid"]

ENCODER_STAGES = 3  # stride-2 3x3 'SAME' convs between the stem and the 1/8 features


def encoder_grid(size: int, stages: int = ENCODER_STAGES) -> Grid:
    """Grid of the backbone's output along an axis of ``size`` input pixels.

    Each stride-2 3x3 'SAME' conv on an input of n cells (stride s, offset o) pads
    ``pad_lo = ((ceil(n/2) - 1) * 2 + 3 - n) // 2`` before, so its cell i is centred on
    input cell ``2i + 1 - pad_lo``: stride 2s, offset ``o + s (0.5 - pad_lo)``
    (+s/2 for even n, -s/2 for odd n). Stride-1 convs (stem, stage convs, ASPP) are
    symmetric and do not move anything.

    Args:
      size: input pixels along the axis.
      stages: stride-2 convs between the input and the output.

    Returns:
      The :class:`rwseg.layers.grid.Grid` of the output cells (stride ``2^stages``).
    """
    n, stride, offset = int(size), 1.0, 0.0
    for _ in range(stages):
        out = -(-n // 2)
        pad_lo = max((out - 1) * 2 + 3 - n, 0) // 2
        offset += stride * (0.5 - pad_lo)
        stride, n = 2.0 * stride, out
    return Grid(stride, offset)


class Backbone(nnx.Module):
    """Stem + strided encoder (1/8) + small ASPP + 1x1 classifier.

    Args:
      num_classes: logits channels.
      width: channels of the stem; stages use ``width * (1, 2, 4)``.
      depth: extra stride-1 3x3 convs per encoder stage.
      aspp_rates: dilation rates of the parallel 3x3 convs at 1/8 resolution.
      features: channels of the decoder features (ASPP projection).
      in_channels: image channels.

    ``__call__(images)`` with images (B, H, W, in_channels) returns a dict:
      ``stem``: (B, H, W, width) first-layer features;
      ``features``: (B, H/8, W/8, features) decoder features;
      ``logits``: (B, H/8, W/8, num_classes).

    ``features`` and ``logits`` lie on :meth:`grid` (cells shifted +3.5 px from the
    block centres for sizes divisible by 8); resample them with :func:`rwseg.layers.grid.upsample`.
    """

    def __init__(self, num_classes: int, *, width: int = 16, depth: int = 1,
                 aspp_rates: Sequence[int] = (1, 2, 3), features: int = 64, norm: str = "group",
                 in_channels: int = 3, rngs: nnx.Rngs):
        self.stem = ConvBlock(in_channels, width, norm=norm, rngs=rngs)
        stages = []
        cin = width
        for mult in (1, 2, 4):
            cout = width * mult
            blocks = [ConvBlock(cin, cout, stride=2, norm=norm, rngs=rngs)]
            blocks += [ConvBlock(cout, cout, norm=norm, rngs=rngs) for _ in range(depth)]
            stages.append(nnx.List(blocks))
            cin = cout
        self.stages = nnx.List(stages)
        self.aspp = nnx.List([
            ConvBlock(cin, features, kernel=1 if r == 0 else 3, dilation=max(int(r), 1), norm=norm, rngs=rngs)
            for r in aspp_rates
        ])
        self.project = ConvBlock(features * len(aspp_rates), features, kernel=1, norm=norm, rngs=rngs)
        self.classifier = nnx.Conv(features, num_classes, (1, 1), rngs=rngs)
        self.num_classes = num_classes
        self.num_features = features
        self.stem_channels = width

    @staticmethod
    def grid(size_hw) -> tuple[Grid, Grid]:
        """Where ``features`` and ``logits`` lie.

        Args:
          size_hw: (H, W) of the images.

        Returns:
          The (rows, cols) :class:`rwseg.layers.grid.Grid` pair (:func:`encoder_grid`).
        """
        return encoder_grid(size_hw[0]), encoder_grid(size_hw[1])

    def __call__(self, images):
        stem = self.stem(images)
        x = stem
        for stage in self.stages:
            for block in stage:
                x = block(x)
        x = jnp.concatenate([branch(x) for branch in self.aspp], axis=-1)
        feats = self.project(x)
        return {"stem": stem, "features": feats, "logits": self.classifier(feats)}
