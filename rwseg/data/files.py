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
    """A missing, corrupt or malformed data file; the message starts with the path.

    Args:
        path: the file (str or path-like); kept as ``.path`` (str).
        problem: what is wrong with it.
    """

    def __init__(self, path, problem: str):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {problem}")


def read_bytes(path) -> bytes:
    """Reads a whole file.

    Args:
        path: the file.

    Returns:
        Its bytes.

    Raises:
        DataFileError: the file is missing or cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataFileError(path, "file not found") from None
    except OSError as e:
        raise DataFileError(path, f"cannot read file ({e})") from None


def decode_rgb(path, data: bytes) -> np.ndarray:
    """Decodes image bytes (JPEG, PNG, anything PIL reads) to RGB.

    Grey or palette images are converted to RGB. PIL's lazy decoding is forced (``load``),
    so a truncated file fails here.

    Args:
        path: the file the bytes were read from (named in errors).
        data: the file's bytes.

    Returns:
        uint8 ``(H, W, 3)``.

    Raises:
        DataFileError: naming ``path``, when the bytes are not a complete image.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise DataFileError(path, f"corrupt or unsupported image ({type(e).__name__}: {e})") from None
    return np.asarray(rgb, dtype=np.uint8)


def read_index_png(path) -> np.ndarray:
    """Reads a single-channel or palette PNG of class indices.

    Palette images (e.g. VOC ``SegmentationClass``) give their palette indices, not
    colours.

    Args:
        path: the PNG file.

    Returns:
        uint8 ``(H, W)`` class indices.

    Raises:
        DataFileError: naming ``path``, when it is missing, corrupt, or neither a palette
            (``P``) nor a grey (``L``) image.
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
    """Checks that a label map has its image's size.

    Args:
        path: the label file (named in the error).
        label: ``(H, W)``.
        image_shape: the image's shape ``(H, W, ...)``.

    Raises:
        DataFileError: naming ``path``, when ``label.shape != image_shape[:2]``.
    """
    if tuple(label.shape) != tuple(image_shape[:2]):
        raise DataFileError(
            path,
            f"label shape {tuple(label.shape)} does not match the image (H, W) = {tuple(image_shape[:2])}",
        )
