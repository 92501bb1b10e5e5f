"""Where a map's cells lie, and the resampling between grids (batched, channels last).

Geometry. :class:`Grid` says where the cells of a map lie in full-resolution pixels
(cell ``i`` centred at ``stride (i + 0.5) + offset``). Every downsampler here is
block-based -- cell ``i`` of the factor-f map stands for the block of pixels
``f i .. f i + f - 1``, centred at ``f (i + 0.5)`` (:func:`pooled_grid`) -- and
:func:`upsample`, the one resampler of the layers and models, maps a map from its grid to
another (by default the full-resolution pixels) with ``jax.image.scale_and_translate`` and
the compensating translation (edge values extended outside, as ``jax.image.resize``
does). A network whose strided convs shift their cells (rwseg's backbone:
:func:`rwseg.models.backbone.encoder_grid`) passes its grid explicitly.

Every layer works on a grid of its own, ``H / downsample x W / downsample`` block centres
of the image, and receives the user's maps (logits, features) at whatever resolution the
network produced them: :func:`to_working_grid` moves a map there (block averaging when
the map is already at image resolution on the pixel grid, else bilinear resampling from
the map's grid); a map's grid defaults to :func:`aligned_grid` (cell ``i`` covers image
pixels ``s i .. s (i + 1)`` with ``s = H / h``, the convention of ``jax.image.resize``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rwseg.constants import IGNORE_INDEX

__all__ = ["Grid", "PIXELS", "pooled_grid", "aligned_grid", "upsample", "avg_pool", "subsample_labels",
           "subsample_scribbles", "to_working_grid", "to_image"]


class Grid(NamedTuple):
    """Cell placement along one axis, in full-resolution continuous pixel coordinates
    (pixel p covers [p, p + 1], its centre is p + 0.5): cell i is centred at
    ``stride * (i + 0.5) + offset``."""

    stride: float
    offset: float = 0.0


PIXELS = Grid(1.0, 0.0)  # the full-resolution pixels themselves


def pooled_grid(factor: int) -> Grid:
    """Grid of a ``factor x factor`` block average / block subsampling (centred blocks)."""
    return Grid(float(factor), 0.0)


def _as_pair(grid):
    return (grid, grid) if isinstance(grid, Grid) else tuple(grid)


def upsample(x, size: tuple[int, int], src, dst=PIXELS):
    """Bilinear resampling of a batched map between cell grids — the one resampler of the layers and models.

    x: (B, h, w, C) whose cells lie on ``src`` (a :class:`Grid` for both axes or a
    (rows, cols) pair, e.g. ``encoder_grid`` of the image size, or ``pooled_grid(f)``);
    returns (B, size[0], size[1], C) sampled at the cell centres of ``dst`` (default:
    the full-resolution pixels). Values beyond the outermost source centres are the edge
    values (as ``jax.image.resize``); for aligned grids (offsets 0) this *is*
    ``jax.image.resize(..., "bilinear")``.
    """
    b, h, w, c = x.shape
    (sy, sx), (dy, dx) = _as_pair(src), _as_pair(dst)
    # In dst-cell coordinates, src cell i is centred at (sy.stride (i + 0.5) + sy.offset - dy.offset) / dy.stride
    # = scale (i + 0.5) + translation. One edge cell of padding on each side makes the kernel see the edge value
    # everywhere scale_and_translate would otherwise return 0 (its support ends at the outermost centres +- 0.5).
    scale = jnp.asarray([sy.stride / dy.stride, sx.stride / dx.stride], jnp.float32)
    trans = jnp.asarray([(sy.offset - dy.offset - sy.stride) / dy.stride,
                         (sx.offset - dx.offset - sx.stride) / dx.stride], jnp.float32)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    out = jax.image.scale_and_translate(padded, (b, size[0], size[1], c), (1, 2), scale, trans,
                                        method="linear", antialias=True)
    return out.astype(x.dtype)


def _blocks(x, factor: int, name: str):
    """(B, H, W, ...) -> (B, H/f, f, W/f, f, ...); ValueError naming ``name`` unless f divides H and W."""
    b, h, w = x.shape[:3]
    if h % factor or w % factor:
        raise ValueError(f"{name}: expected H, W divisible by factor {factor}, got {(h, w)}")
    return x.reshape((b, h // factor, factor, w // factor, factor) + x.shape[3:])


def avg_pool(x, factor: int):
    """Average-pool a batched map by an integer factor: (B, H, W, C) -> (B, H/f, W/f, C).

    The result lies on ``pooled_grid(factor)``."""
    if factor == 1:
        return x
    return _blocks(x, factor, "avg_pool").mean(axis=(2, 4))


def subsample_labels(labels, factor: int, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """Block-majority subsampling of dense labels: (B, H, W) -> (B, H/f, W/f) on ``pooled_grid(f)``.

    Each block takes its most frequent valid label (ties: the smallest), ``ignore_index``
    when it has none. (Picking one pixel per block, e.g. ``labels[:, f//2::f, f//2::f]``,
    is off the block centre by half a pixel for even f: the bias the models avoid.)
    """
    if factor == 1:
        return labels
    blocks = _blocks(labels, factor, "labels")
    valid = (blocks >= 0) & (blocks < num_classes)
    onehot = jax.nn.one_hot(jnp.where(valid, blocks, num_classes), num_classes + 1, dtype=jnp.int32)
    counts = onehot.sum(axis=(2, 4))[..., :num_classes]
    mode = jnp.argmax(counts, axis=-1).astype(labels.dtype)
    return jnp.where(counts.max(axis=-1) > 0, mode, jnp.asarray(ignore_index, labels.dtype))


def subsample_scribbles(scribbles, factor: int):
    """Downsample sparse labels (-1 = unlabelled) so that thin strokes survive.

    (B, H, W) int -> (B, H/f, W/f) on ``pooled_grid(f)``: a block takes the largest label among its labelled
    pixels, -1 when it has none. (Blocks crossing two strokes keep one label.)
    """
    if factor == 1:
        return scribbles
    return _blocks(scribbles, factor, "scribbles").max(axis=(2, 4))


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
