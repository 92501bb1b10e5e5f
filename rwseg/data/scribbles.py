"""Synthetic scribbles drawn from dense labels (RAWKS trains from them; real scribble sets
are not available here). Numpy preprocessing for the input pipeline, not traceable."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from rwseg import _validate as V
from rwseg.data.constants import IGNORE_INDEX

__all__ = ["scribbles_from_labels"]


def _rng_from_key(key) -> np.random.Generator:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())


def _stroke(mask, start, length, rng) -> list:
    """A smooth random stroke of up to ``length`` pixels inside ``mask`` from ``start``."""
    h, w = mask.shape
    pos = np.array(start, float)
    angle = rng.uniform(0, 2 * np.pi)
    pixels = [tuple(start)]
    turned = False
    while len(pixels) < length:
        angle += rng.normal(0, 0.3)
        nxt = pos + (np.sin(angle), np.cos(angle))
        y, x = int(round(nxt[0])), int(round(nxt[1]))
        if not (0 <= y < h and 0 <= x < w and mask[y, x]):
            if turned:
                break
            angle += np.pi  # turn back once, then stop at the next wall
            turned = True
            continue
        pos = nxt
        if (y, x) != pixels[-1]:
            pixels.append((y, x))
    return pixels


def scribbles_from_labels(
    labels,
    key,
    *,
    density: float = 0.03,
    stroke_length: Optional[int] = None,
    margin: int = 2,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Synthetic scribbles from dense labels (real scribble sets are not available here).

    For every 4-connected region of one label (``ignore_index`` / negative labels
    skipped), strokes (smooth random walks) are drawn inside the region, ``margin``
    pixels away from its border where the region is thick enough (else anywhere inside
    it), until about ``density`` of the region's pixels are covered, with at least one
    stroke per region. Numpy preprocessing, not traceable; deterministic for a given key.

    Args:
        labels: (H, W) int, concrete.
        key: a JAX PRNG key.
        density: fraction in (0, 1] of each region to cover.
        stroke_length: stroke length in pixels; defaults to ``max(3, sqrt(region area))``.
        margin: distance in pixels to keep from region borders.
        ignore_index: label value to skip.

    Returns:
        seeds: (H, W) int32 numpy array, -1 unlabelled, else the label (every seed lies on a
            pixel of that label).
    """
    V.check_rank("labels", labels, 2, "(H, W)")
    V.check_integer("labels", labels)
    if not V.is_concrete(labels):
        raise TypeError("labels: expected a concrete array (scribbles_from_labels is numpy preprocessing), "
                        "got a tracer; call it outside jit/vmap")
    if not 0 < density <= 1:
        raise ValueError(f"density: expected a fraction in (0, 1], got {density!r}")
    if stroke_length is not None:
        stroke_length = V.check_nonnegative_int("stroke_length", stroke_length, positive=True)
    margin = V.check_nonnegative_int("margin", margin)
    labels = np.asarray(labels)
    rng = _rng_from_key(key)
    seeds = np.full(labels.shape, -1, np.int32)
    for value in np.unique(labels):
        if value < 0 or value == ignore_index:
            continue
        regions, n = ndimage.label(labels == value)  # 4-connected by default
        for r in range(1, n + 1):
            region = regions == r
            area = int(region.sum())
            inner = ndimage.distance_transform_edt(region) > margin
            mask = inner if inner.any() else region
            length = stroke_length or max(3, int(round(np.sqrt(area))))
            budget = max(1, int(round(density * area)))
            covered = 0
            for _ in range(max(1, int(np.ceil(budget / length)))):
                ys, xs = np.nonzero(mask)
                i = rng.integers(len(ys))
                pix = _stroke(mask, (ys[i], xs[i]), min(length, budget - covered if covered else length), rng)
                for y, x in pix:
                    seeds[y, x] = value
                covered += len(pix)
                if covered >= budget:
                    break
    return seeds
