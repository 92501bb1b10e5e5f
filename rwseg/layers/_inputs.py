"""Argument checks shared by the refinement layers (batched, channels last); the resampling
between grids is :mod:`rwseg.layers.grid`."""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["check_image", "check_map", "check_labels"]


def _shape(x):
    return tuple(getattr(x, "shape", ()))


def check_image(image, *, channels: int | None, downsample: int = 1, name: str = "image"):
    """image: (B, H, W, channels) float (``channels=None``: any) with H, W divisible by ``downsample``;
    errors name the argument ``name``.

    Returns (B, H, W).
    """
    shape = _shape(image)
    if len(shape) != 4 or (channels is not None and shape[-1] != channels):
        raise ValueError(f"{name}: expected shape (B, H, W, {'C' if channels is None else channels}), got {shape}")
    if not jnp.issubdtype(image.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating dtype, got {image.dtype}")
    if shape[1] % downsample or shape[2] % downsample:
        raise ValueError(f"{name}: expected H, W divisible by downsample={downsample}, got {shape[1:3]}")
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


