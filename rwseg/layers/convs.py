"""Conv blocks: rwseg's backbone and the small image networks of the layers that look at the
image (SPN guidance, RAWKS boundary, the dilated affinity decoder)."""

from __future__ import annotations

import jax
from flax import nnx

__all__ = ["ConvBlock", "conv_stack", "apply_stack"]


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


def conv_stack(in_channels: int, width: int, depth: int, *, norm: str, rngs: nnx.Rngs):
    """``depth`` 3x3 :class:`ConvBlock` s (``in_channels`` -> ``width``): (nnx.List, output channels)."""
    blocks, cin = [], in_channels
    for _ in range(depth):
        blocks.append(ConvBlock(cin, width, norm=norm, rngs=rngs))
        cin = width
    return nnx.List(blocks), cin


def apply_stack(blocks, x):
    """``x`` through the blocks of :func:`conv_stack` in order: (B, H, W, in_channels) -> (B, H, W, width)."""
    for block in blocks:
        x = block(x)
    return x
