"""Per-example augmentation and normalisation (numpy, one image at a time).

All functions take an image ``(H, W, 3)`` and a label ``(H, W)`` int32 (255 = ignore)
and keep them aligned: geometry is applied to both, with bilinear interpolation for the
image and nearest-neighbour for the label (both on pixel centres, PIL convention). A
``mask`` (bool ``(H, W)``) marks pixels that come from the image (False on padding).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from rwseg.data.constants import DEFAULT_MEAN, DEFAULT_STD, IGNORE_INDEX


def normalize(image, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> np.ndarray:
    """uint8 ``(..., 3)`` in 0..255 -> float32 ``(image - mean) / std``."""
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    return (np.asarray(image, dtype=np.float32) - mean) / std


def denormalize(images, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> np.ndarray:
    """Inverse of :func:`normalize` for pictures: float ``(..., 3)`` -> uint8 (rounded, clipped)."""
    images = np.asarray(images, dtype=np.float32)
    out = images * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize(image: np.ndarray, label: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize uint8 image (bilinear) and int label (nearest) to ``size = (H, W)``."""
    h, w = size
    if (h, w) == image.shape[:2]:
        return image, label
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    if label.min() < 0 or label.max() > 255:
        raise ValueError(f"label: expected values in 0..255 to resize, got range [{label.min()}, {label.max()}]")
    lab = np.asarray(Image.fromarray(label.astype(np.uint8)).resize((w, h), Image.NEAREST)).astype(np.int32)
    return img, lab


def random_scale(image, label, rng: np.random.Generator, scale_range=(0.75, 1.25)):
    """Resize both by a factor drawn uniformly from ``scale_range`` (sizes rounded, >= 1)."""
    lo, hi = scale_range
    s = rng.uniform(lo, hi)
    h, w = image.shape[:2]
    return resize(image, label, (max(1, round(h * s)), max(1, round(w * s))))


def color_jitter(image, rng: np.random.Generator, strength=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Random photometric change of an RGB image (the label is untouched).

    ``strength = (brightness, contrast, saturation)``, each ``s >= 0``: a factor ``f`` is
    drawn uniformly from ``[1 - s, 1 + s]`` for each non-zero strength, in this order, and
    applied as ``f * x`` (brightness), ``mean(gray) + f * (x - mean(gray))`` (contrast) and
    ``gray + f * (x - gray)`` (saturation), where ``gray`` is the ITU-R 601 luma
    ``0.299 R + 0.587 G + 0.114 B``. image: uint8 or float ``(H, W, 3)`` in 0..255 ->
    float32 in 0..255 (clipped after each step). No random number is drawn for a zero
    strength, so ``(0, 0, 0)`` leaves the image and the random stream unchanged.
    """
    b, c, s = (float(v) for v in strength)
    x = np.asarray(image, dtype=np.float32)
    luma = np.asarray([0.299, 0.587, 0.114], np.float32)
    if b > 0:
        x = np.clip(x * np.float32(rng.uniform(1 - b, 1 + b)), 0, 255)
    if c > 0:
        m = np.float32((x @ luma).mean())
        x = np.clip(m + np.float32(rng.uniform(1 - c, 1 + c)) * (x - m), 0, 255)
    if s > 0:
        gray = (x @ luma)[..., None]
        x = np.clip(gray + np.float32(rng.uniform(1 - s, 1 + s)) * (x - gray), 0, 255)
    return x


def pad_to(image: np.ndarray, label: np.ndarray, mask: np.ndarray, size: tuple[int, int]):
    """Pad bottom/right to at least ``size``: image 0, label ``IGNORE_INDEX``, mask False."""
    h, w = image.shape[:2]
    ph, pw = max(0, size[0] - h), max(0, size[1] - w)
    if ph == 0 and pw == 0:
        return image, label, mask
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
    label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=False)
    return image, label, mask


def random_crop(image, label, mask, size: tuple[int, int], rng: np.random.Generator):
    """Crop a window of ``size`` at a uniform random position (pads first if needed)."""
    image, label, mask = pad_to(image, label, mask, size)
    h, w = image.shape[:2]
    y = int(rng.integers(0, h - size[0] + 1))
    x = int(rng.integers(0, w - size[1] + 1))
    win = (slice(y, y + size[0]), slice(x, x + size[1]))
    return image[win], label[win], mask[win]


def random_flip(image, label, mask, rng: np.random.Generator):
    """Mirror left-right with probability 1/2."""
    if rng.random() < 0.5:
        return image[:, ::-1], label[:, ::-1], mask[:, ::-1]
    return image, label, mask
