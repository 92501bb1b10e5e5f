"""Argument checks and resampling shared by the refinement layers (batched, channels last).

Every layer works on a grid of its own, ``H / downsample x W / downsample`` block
centres of the image (:func:`rwseg.models.backbone.pooled_grid`), and receives the
user's maps (logits, features) at whatever resolution the network produced them.
:func:`to_working_grid` moves a map there: block averaging when the map is already at
image resolution on the pixel grid, else bilinear resampling from the map's grid with
:func:`rwseg.models.backbone.upsample`. A map's grid defaults to the aligned one
(:func:`aligned_grid`: cell ``i`` covers image pixels ``s i .. s (i + 1)`` with
``s = H / h``, the convention of ``jax.image.resize``); networks whose strided convs
shift their cells (rwseg's own backbone: :meth:`rwseg.models.backbone.Backbone.grid`)
pass their grid explicitly.
"""

from __future__ import annotations

import jax.numpy as jnp

from rwseg.models.backbone import Grid, pooled_grid, upsample
from rwseg.models.common import avg_pool

__all__ = ["aligned_grid", "check_image", "check_map", "check_labels", "to_working_grid", "to_image"]


def _shape(x):
    return tuple(getattr(x, "shape", ()))


def check_image(image, *, channels: int | None, downsample: int = 1):
    """image: (B, H, W, channels) float (``channels=None``: any) with H, W divisible by ``downsample``.

    Returns (B, H, W).
    """
    shape = _shape(image)
    if len(shape) != 4 or (channels is not None and shape[-1] != channels):
        raise ValueError(f"image: expected shape (B, H, W, {'C' if channels is None else channels}), got {shape}")
    if not jnp.issubdtype(image.dtype, jnp.floating):
        raise ValueError(f"image: expected a floating dtype, got {image.dtype}")
    if shape[1] % downsample or shape[2] % downsample:
        raise ValueError(f"image: expected H, W divisible by downsample={downsample}, got {shape[1:3]}")
    return shape[:3]


def check_map(name: str, x, batch: int, channels: int | None, what: str):
    """x: (batch, h, w, channels) float (``channels=None``: any); ``what`` names the last axis."""
    shape = _shape(x)
    want = "C" if channels is None else channels
    if len(shape) != 4 or shape[0] != batch or (channels is not None and shape[-1] != channels):
        raise ValueError(f"{name}: expected shape (B, h, w, {want}) with B = {batch} as image and "
                         f"{want} = {what}, got {shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")


def check_labels(name: str, labels, image_shape):
    """labels: (B, H, W) int matching the image."""
    shape = _shape(labels)
    if shape != tuple(image_shape):
        raise ValueError(f"{name}: expected shape (B, H, W) = {tuple(image_shape)} of image, got {shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name}: expected an integer dtype, got {labels.dtype}")


def aligned_grid(map_hw, image_hw) -> tuple[Grid, Grid]:
    """(rows, cols) grid of a (h, w) map that tiles an (H, W) image evenly (``jax.image.resize``'s)."""
    return (Grid(image_hw[0] / map_hw[0], 0.0), Grid(image_hw[1] / map_hw[1], 0.0))


def to_working_grid(x, image_hw, downsample: int, grid=None):
    """A map (B, h, w, C) on ``grid`` (default :func:`aligned_grid`) -> (B, H/f, W/f, C) on ``pooled_grid(f)``.

    A map at image resolution with no grid given is block-averaged (exactly the pooled
    image features); any other map is resampled bilinearly from its grid.
    """
    small = (image_hw[0] // downsample, image_hw[1] // downsample)
    if grid is None:
        if tuple(x.shape[1:3]) == tuple(image_hw):
            return avg_pool(x, downsample)
        grid = aligned_grid(x.shape[1:3], image_hw)
    return upsample(x, small, grid, pooled_grid(downsample))


def to_image(x, image_hw, downsample: int):
    """A map (B, H/f, W/f, C) on ``pooled_grid(f)`` -> (B, H, W, C) on the image pixels (bilinear)."""
    return upsample(x, tuple(image_hw), pooled_grid(downsample))
