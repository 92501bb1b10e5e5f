"""Reading image and label files with errors that name the file.

Every reader raises :class:`DataFileError` (a ``ValueError``) whose message starts with
the offending path, for a missing file, a file that cannot be decoded, or content of
the wrong shape/values. Builders call these at build time, so a bad file stops the
build with its name instead of producing a silently wrong dataset.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


class DataFileError(ValueError):
    """A missing, corrupt or malformed data file; ``.path`` is the file."""

    def __init__(self, path, problem: str):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {problem}")


def read_bytes(path) -> bytes:
    """The raw bytes of ``path``; :class:`DataFileError` if missing or unreadable."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataFileError(path, "file not found") from None
    except OSError as e:
        raise DataFileError(path, f"cannot read file ({e})") from None


def decode_rgb(path, data: bytes) -> np.ndarray:
    """Decode image bytes (JPEG/PNG) read from ``path`` to uint8 ``(H, W, 3)``.

    Grey or palette images are converted to RGB. Truncated or corrupt files raise
    :class:`DataFileError` naming ``path`` (PIL's lazy decoding is forced with ``load``).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise DataFileError(path, f"corrupt or unsupported image ({type(e).__name__}: {e})") from None
    return np.asarray(rgb, dtype=np.uint8)


def read_rgb(path) -> np.ndarray:
    """Read an image file as uint8 ``(H, W, 3)``; errors name ``path``."""
    return decode_rgb(path, read_bytes(path))


def read_index_png(path) -> np.ndarray:
    """Read a single-channel or palette PNG of class indices as uint8 ``(H, W)``.

    Palette images (e.g. VOC ``SegmentationClass``) give their palette indices, not
    colours. Errors name ``path``.
    """
    data = read_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("P", "L"):
                raise DataFileError(path, f"expected a palette (P) or grey (L) label PNG, got mode {im.mode!r}")
            return np.asarray(im, dtype=np.uint8)
    except DataFileError:
        raise
    except Exception as e:
        raise DataFileError(path, f"corrupt label image ({type(e).__name__}: {e})") from None


def check_label_shape(path, label: np.ndarray, image_shape) -> None:
    """Raise :class:`DataFileError` naming ``path`` unless ``label.shape == image (H, W)``."""
    if tuple(label.shape) != tuple(image_shape[:2]):
        raise DataFileError(
            path,
            f"label shape {tuple(label.shape)} does not match the image (H, W) = {tuple(image_shape[:2])}",
        )
