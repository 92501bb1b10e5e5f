"""PNG panels: image | ground truth | prediction columns (PIL only, no display needed)."""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["PALETTE", "palette", "colorize", "save_panels"]

IGNORE_COLOR = (0, 0, 0)
PALETTE = np.array(
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
     [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207], [174, 199, 232], [255, 187, 120],
     [152, 223, 138], [255, 152, 150], [197, 176, 213], [196, 156, 148], [247, 182, 210], [199, 199, 199],
     [219, 219, 141], [158, 218, 229]], np.uint8)
"""The one class palette of rwseg: (20, 3) uint8 RGB, matplotlib's tab20 order (without
matplotlib at import time). Used by :func:`palette` (the panels) and the notebooks' ``viz.color_labels``;
ignored pixels are black in both."""


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 distinct colours (:data:`PALETTE`, then seeded).

    Args:
      num_classes: K.

    Returns:
      (K, 3) uint8.
    """
    base = PALETTE
    if num_classes <= len(base):
        return base[:num_classes].copy()
    extra = np.random.default_rng(0).integers(0, 256, (num_classes - len(base), 3), dtype=np.uint8)
    return np.concatenate([base, extra])


def colorize(labels, num_classes: int) -> np.ndarray:
    """(H, W) int labels -> (H, W, 3) uint8; labels outside [0, num_classes) are black.

    Args:
      labels: (H, W) int.
      num_classes: K.

    Returns:
      (H, W, 3) uint8.
    """
    labels = np.asarray(labels)
    pal = palette(num_classes)
    ok = (labels >= 0) & (labels < num_classes)
    out = np.zeros(labels.shape + (3,), np.uint8)
    out[ok] = pal[labels[ok]]
    out[~ok] = IGNORE_COLOR
    return out


def save_panels(path, images, columns: dict, num_classes: int, *, scale: int = 3) -> pathlib.Path:
    """Write one PNG with a row per image: the image, then one column per label map.

    Args:
      path: the PNG to write.
      images: (N, H, W, 3) uint8.
      columns: ordered ``{title: (N, H, W) int labels}``, e.g. ``{"ground truth": ...,
        "baseline": ..., "spn": ...}``.
      num_classes: K (the palette).
      scale: pixels are upscaled ``scale`` x (nearest) so small maps stay visible.

    Returns:
      The path.
    """
    images = np.asarray(images)
    n, h, w, _ = images.shape
    titles = ["image"] + list(columns)
    tiles_per_row = [[images[i]] + [colorize(np.asarray(c)[i], num_classes) for c in columns.values()]
                     for i in range(n)]
    pad, header = 4, 14
    cw, ch = w * scale, h * scale
    canvas = Image.new("RGB", (len(titles) * (cw + pad) + pad, header + n * (ch + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        draw.text((pad + j * (cw + pad), 1), title, fill=(0, 0, 0))
    for i, row in enumerate(tiles_per_row):
        for j, tile in enumerate(row):
            img = Image.fromarray(np.asarray(tile, np.uint8)).resize((cw, ch), Image.NEAREST)
            canvas.paste(img, (pad + j * (cw + pad), header + pad + i * (ch + pad)))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
