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
    """Normalises pictures: ``(image - mean) / std`` in float32.

    Args:
        image: uint8 (or any real) ``(..., 3)``, values in 0..255.
        mean: per-channel mean ``(3,)`` in 0..255 units (default ImageNet's).
        std: per-channel standard deviation ``(3,)`` in 0..255 units (default ImageNet's).

    Returns:
        float32 ``(..., 3)``, the shape of ``image``.
    """
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    return (np.asarray(image, dtype=np.float32) - mean) / std


def denormalize(images, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> np.ndarray:
    """Inverse of :func:`normalize`, for showing pictures.

    Args:
        images: float ``(..., 3)``, normalised with ``mean`` and ``std``.
        mean: per-channel mean ``(3,)`` in 0..255 units, as given to :func:`normalize`.
        std: per-channel standard deviation ``(3,)`` in 0..255 units, as given to :func:`normalize`.

    Returns:
        uint8 ``(..., 3)``: ``images * std + mean``, rounded and clipped to 0..255.
    """
    images = np.asarray(images, dtype=np.float32)
    out = images * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize(image: np.ndarray, label: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resizes an image (bilinear) and its label map (nearest neighbour) to ``size``.

    Args:
        image: uint8 ``(H, W, 3)``.
        label: int ``(H, W)``, values in 0..255 (255 = ignore).
        size: ``(H', W')``, the new size.

    Returns:
        ``(image, label)``: uint8 ``(H', W', 3)`` and int32 ``(H', W')``; the inputs
        themselves when the size does not change.

    Raises:
        ValueError: ``label`` has values outside 0..255.
    """
    h, w = size
    if (h, w) == image.shape[:2]:
        return image, label
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    if label.min() < 0 or label.max() > 255:
        raise ValueError(f"label: expected values in 0..255 to resize, got range [{label.min()}, {label.max()}]")
    lab = np.asarray(Image.fromarray(label.astype(np.uint8)).resize((w, h), Image.NEAREST)).astype(np.int32)
    return img, lab


def random_scale(image, label, rng: np.random.Generator, scale_range=(0.75, 1.25)):
    """Resizes an image and its labels by a factor drawn uniformly from ``scale_range``.

    Args:
        image: uint8 ``(H, W, 3)``.
        label: int ``(H, W)``, values in 0..255.
        rng: the random generator that draws the factor.
        scale_range: ``(low, high)`` bounds of the factor.

    Returns:
        ``(image, label)`` resized as by :func:`resize`, to ``(round(s H), round(s W))``
        (at least 1 pixel each).
    """
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
    """Pads at the bottom and right to at least ``size``.

    Args:
        image: ``(H, W, 3)``; padded with 0.
        label: int ``(H, W)``; padded with ``IGNORE_INDEX``.
        mask: bool ``(H, W)``, True on image pixels; padded with False.
        size: ``(h, w)``, the smallest size wanted.

    Returns:
        ``(image, label, mask)`` of size ``(max(H, h), max(W, w))``; the inputs when no
        padding is needed.
    """
    h, w = image.shape[:2]
    ph, pw = max(0, size[0] - h), max(0, size[1] - w)
    if ph == 0 and pw == 0:
        return image, label, mask
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
    label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=False)
    return image, label, mask


def random_crop(image, label, mask, size: tuple[int, int], rng: np.random.Generator):
    """Crops a window of ``size`` at a uniformly random position (padding first if needed).

    Args:
        image: ``(H, W, 3)``.
        label: int ``(H, W)``.
        mask: bool ``(H, W)``, True on image pixels.
        size: ``(h, w)``, the window.
        rng: the random generator that draws the position.

    Returns:
        ``(image, label, mask)`` of size ``(h, w)``; padding (see :func:`pad_to`) has
        label ``IGNORE_INDEX`` and mask False.
    """
    image, label, mask = pad_to(image, label, mask, size)
    h, w = image.shape[:2]
    y = int(rng.integers(0, h - size[0] + 1))
    x = int(rng.integers(0, w - size[1] + 1))
    win = (slice(y, y + size[0]), slice(x, x + size[1]))
    return image[win], label[win], mask[win]


def random_flip(image, label, mask, rng: np.random.Generator):
    """Mirrors left-right with probability 1/2.

    Args:
        image: ``(H, W, 3)``.
        label: ``(H, W)``.
        mask: ``(H, W)``.
        rng: the random generator that draws the coin.

    Returns:
        ``(image, label, mask)``, all three mirrored or none.
    """
    if rng.random() < 0.5:
        return image[:, ::-1], label[:, ::-1], mask[:, ::-1]
    return image, label, mask
