"""Losses and resampling helpers shared by the models (batched, channels last).

Alignment: every downsampler here is block-based — cell i of the factor-f map stands
for the block of pixels ``f i .. f i + f - 1``, centred at ``f (i + 0.5)``
(:func:`rwseg.models.backbone.pooled_grid`) — so maps at a walk / CRF / propagation
resolution are exchanged with the backbone's 1/8 maps and the full-resolution images
only through :func:`rwseg.models.backbone.upsample` with their grids.

Everything here is a small pure function on batched arrays ``(B, H, W, ...)``; the
per-image operators of rwseg are vmapped by the models themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rwseg._numerics import masked_mean
from rwseg.constants import IGNORE_INDEX

from rwseg.models.backbone import PIXELS, Grid, encoder_grid, pooled_grid, upsample

__all__ = ["cross_entropy", "avg_pool", "subsample_labels",
           "subsample_scribbles", "upsample", "Grid", "PIXELS", "encoder_grid", "pooled_grid"]



def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX):
    """Softmax cross-entropy averaged over the non-ignored pixels of the whole batch.

    logits: (B, H, W, K) float; labels: (B, H, W) int (``ignore_index`` or negative =
    ignored) -> scalar. The mean is over the *global* batch, so a data-parallel step
    gives the same value (and gradient) as one device. The per-pixel loss is optax's
    ``softmax_cross_entropy_with_integer_labels`` with the valid pixels as ``where``.
    """
    num_classes = logits.shape[-1]
    valid = (labels >= 0) & (labels != ignore_index) & (labels < num_classes)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0), where=valid)
    return masked_mean(nll, valid)


def avg_pool(x, factor: int):
    """Average-pool a batched map by an integer factor: (B, H, W, C) -> (B, H/f, W/f, C).

    The result lies on ``pooled_grid(factor)``."""
    if factor == 1:
        return x
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"avg_pool: expected H, W divisible by factor {factor}, got {(h, w)}")
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def subsample_labels(labels, factor: int, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """Block-majority subsampling of dense labels: (B, H, W) -> (B, H/f, W/f) on ``pooled_grid(f)``.

    Each block takes its most frequent valid label (ties: the smallest), ``ignore_index``
    when it has none. (Picking one pixel per block, e.g. ``labels[:, f//2::f, f//2::f]``,
    is off the block centre by half a pixel for even f: the bias the models avoid.)
    """
    if factor == 1:
        return labels
    b, h, w = labels.shape
    if h % factor or w % factor:
        raise ValueError(f"labels: expected H, W divisible by factor {factor}, got {(h, w)}")
    blocks = labels.reshape(b, h // factor, factor, w // factor, factor)
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
    b, h, w = scribbles.shape
    if h % factor or w % factor:
        raise ValueError(f"scribbles: expected H, W divisible by factor {factor}, got {(h, w)}")
    blocks = scribbles.reshape(b, h // factor, factor, w // factor, factor)
    return blocks.max(axis=(2, 4))
