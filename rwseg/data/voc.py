"""Reader for PASCAL VOC 2012 semantic segmentation (``VOCtrainval_11-May-2012``).

TFDS's catalogue ``voc/2012`` holds boxes and image-level labels only (no masks), so
rwseg builds its own TFDS dataset from the official layout::

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClass/<id>.png           palette PNG: 0..20 classes, 255 = border/void
    <root>/ImageSets/Segmentation/{train,val}.txt

``root`` is the ``VOC2012`` folder, or any folder containing ``VOCdevkit/VOC2012``
(:func:`find_root`). The 255 border stays 255 (``IGNORE_INDEX``). Errors name the file.
"""

from __future__ import annotations

import pathlib

import numpy as np

from rwseg.data import files
from rwseg.data.constants import IGNORE_INDEX

CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
NUM_CLASSES = len(CLASS_NAMES)
SPLIT_FILES = {"train": "train.txt", "validation": "val.txt"}


def find_root(path) -> pathlib.Path:
    """The ``VOC2012`` folder at or below ``path``; ``DataFileError`` if there is none."""
    path = pathlib.Path(path)
    for cand in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if (cand / "ImageSets" / "Segmentation").is_dir():
            return cand
    raise files.DataFileError(path, "no VOC2012 layout found (expected ImageSets/Segmentation/ here, in VOC2012/ or in VOCdevkit/VOC2012/)")


def split_ids(root, split: str) -> list[str]:
    """Ids listed in ``ImageSets/Segmentation/{train,val}.txt``."""
    path = pathlib.Path(root) / "ImageSets" / "Segmentation" / SPLIT_FILES[split]
    ids = files.read_bytes(path).decode().split()
    if not ids:
        raise files.DataFileError(path, "no ids listed")
    return ids


def read_example(root, example_id: str) -> dict:
    """Read and check one example: ``{"id", "image_bytes", "image": uint8 (H, W, 3), "label": uint8 (H, W)}``."""
    root = pathlib.Path(root)
    image_path = root / "JPEGImages" / f"{example_id}.jpg"
    label_path = root / "SegmentationClass" / f"{example_id}.png"
    image_bytes = files.read_bytes(image_path)
    image = files.decode_rgb(image_path, image_bytes)
    label = files.read_index_png(label_path)
    files.check_label_shape(label_path, label, image.shape)
    bad = (label >= NUM_CLASSES) & (label != IGNORE_INDEX)
    if bad.any():
        raise files.DataFileError(label_path, f"label values {np.unique(label[bad])[:5].tolist()} out of range: expected 0..{NUM_CLASSES - 1} or 255")
    return {"id": example_id, "image_bytes": image_bytes, "image": image, "label": label}
