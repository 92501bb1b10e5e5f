"""The small image network of the layers that look at the image (SPN guidance, RAWKS boundary)."""

from __future__ import annotations

from flax import nnx

from rwseg.models.backbone import ConvBlock

__all__ = ["conv_stack", "apply_stack"]


def conv_stack(in_channels: int, width: int, depth: int, *, norm: str, rngs: nnx.Rngs):
    """``depth`` 3x3 :class:`ConvBlock` s (``in_channels`` -> ``width``): (nnx.List, output channels)."""
    blocks, cin = [], in_channels
    for _ in range(depth):
        blocks.append(ConvBlock(cin, width, norm=norm, rngs=rngs))
        cin = width
    return nnx.List(blocks), cin


def apply_stack(blocks, x):
    for block in blocks:
        x = block(x)
    return x
