"""A compact DeepLab-style backbone in Flax NNX (shared by every method).

Layout: a full-resolution *stem* (one 3x3 conv; its output is the "first-layer
features" RWN's affinity branch uses), a strided encoder down to 1/8 resolution
(three stride-2 stages, ``depth`` extra 3x3 convs each), a small ASPP (parallel dilated
3x3 convs, concatenated, 1x1 projection) and a 1x1 classifier giving 1/8-resolution
logits — the DeepLab recipe (seed 000 §3.1, seed 004 §4) at laptop size.

Normalisation is GroupNorm or none (``norm="group" | "none"``): no BatchNorm, so a
model has no mutable batch statistics and a data-parallel step is a pure function
of (params, batch) whatever the number of devices.

Inputs are batched ``(B, H, W, 3)``; H and W should be multiples of 8 (other sizes
work, the 1/8 map is then ``ceil(H / 8)``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ConvBlock", "Backbone", "upsample"]


def upsample(x, size: tuple[int, int]):
    """Bilinear resize of a batched map: (B, h, w, C) -> (B, size[0], size[1], C)."""
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, size[0], size[1], c), method="bilinear").astype(x.dtype)


class ConvBlock(nnx.Module):
    """3x3 (or k x k) conv -> GroupNorm (optional) -> ReLU."""

    def __init__(self, cin: int, cout: int, *, kernel: int = 3, stride: int = 1, dilation: int = 1,
                 norm: str = "group", rngs: nnx.Rngs):
        if norm not in ("group", "none"):
            raise ValueError(f"norm: expected 'group' or 'none', got {norm!r}")
        self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=stride, kernel_dilation=dilation,
                             use_bias=norm == "none", rngs=rngs)
        self.norm = nnx.GroupNorm(cout, num_groups=min(8, cout), rngs=rngs) if norm == "group" else None

    def __call__(self, x):
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return jax.nn.relu(x)


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

    def __call__(self, images):
        stem = self.stem(images)
        x = stem
        for stage in self.stages:
            for block in stage:
                x = block(x)
        x = jnp.concatenate([branch(x) for branch in self.aspp], axis=-1)
        feats = self.project(x)
        return {"stem": stem, "features": feats, "logits": self.classifier(feats)}
