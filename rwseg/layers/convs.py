"""Conv blocks: rwseg's backbone and the small image networks of the layers that look at the
image (SPN guidance, RAWKS boundary, the dilated affinity decoder)."""

from __future__ import annotations

import jax
from flax import nnx

from rwseg.layers.memory import COMPUTE_DTYPES, call_block, group_norm

__all__ = ["ConvBlock", "conv_stack", "apply_stack", "set_compute_dtype"]


class ConvBlock(nnx.Module):
    """3x3 (or k x k) conv -> GroupNorm (optional) -> ReLU."""

    def __init__(self, cin: int, cout: int, *, kernel: int = 3, stride: int = 1, dilation: int = 1,
                 norm: str = "group", rngs: nnx.Rngs):
        if norm not in ("group", "none"):
            raise ValueError(f"norm: expected 'group' or 'none', got {norm!r}")
        self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=stride, kernel_dilation=dilation,
                             use_bias=norm == "none", rngs=rngs)
        self.norm = nnx.GroupNorm(cout, num_groups=min(8, cout), rngs=rngs) if norm == "group" else None

    def forward(self, x):
        """The block without rematerialisation (:func:`rwseg.layers.memory.call_block` wraps it).

        Args:
          x: (B, H, W, cin).

        Returns:
          (B, H', W', cout) in the block's compute dtype.
        """
        x = self.conv(x)
        if self.norm is not None:
            x = group_norm(self.norm, x)  # nnx.GroupNorm itself in float32; in bfloat16 without float32 copies
        return jax.nn.relu(x)

    def __call__(self, x):
        return call_block(self, x)


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


def set_compute_dtype(model: nnx.Module, compute_dtype: str = "float32") -> nnx.Module:
    """Set the compute dtype of every ``ConvBlock`` in ``model`` (in place; returns ``model``).

    Args:
      model: any rwseg model or layer (an ``nnx.Module``).
      compute_dtype: ``"float32"`` or ``"bfloat16"`` (``config.compute_dtype``).

    Returns:
      ``model``, whose ``ConvBlock`` convolutions and GroupNorms compute in that dtype
      (``dtype``; their ``param_dtype`` stays float32). The dtype is a static attribute:
      it is part of the graph definition ``nnx.split`` returns.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"config.compute_dtype: expected one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    dtype = None if compute_dtype == "float32" else COMPUTE_DTYPES[compute_dtype]
    for _, module in nnx.iter_modules(model):
        if isinstance(module, ConvBlock):
            module.conv.dtype = dtype
            if module.norm is not None:
                module.norm.dtype = dtype
    return model
