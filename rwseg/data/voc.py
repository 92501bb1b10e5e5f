"""Reader for PASCAL VOC 2012 semantic segmentation (``VOCtrainval_11-May-2012``).

TFDS's catalogue ``voc/2012`` holds boxes and image-level labels only (no masks), so
rwseg builds its own TFDS dataset from the official layout:

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
    """Finds the ``VOC2012`` folder.

    Args:
        path: the ``VOC2012`` folder, its parent, or the parent of ``VOCdevkit/``.

    Returns:
        The folder that holds ``ImageSets/Segmentation/``.

    Raises:
        DataFileError: naming ``path``, when none of the three places has the layout.
    """
    path = pathlib.Path(path)
    for cand in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if (cand / "ImageSets" / "Segmentation").is_dir():
            return cand
    raise files.DataFileError(path, "no VOC2012 layout found (expected ImageSets/Segmentation/ here, in VOC2012/ or in VOCdevkit/VOC2012/)")


def split_ids(root, split: str) -> list[str]:
    """The ids of one split.

    Args:
        root: the ``VOC2012`` folder.
        split: ``"train"`` (``train.txt``) or ``"validation"`` (``val.txt``).

    Returns:
        The ids listed in ``ImageSets/Segmentation/{train,val}.txt``, in file order.

    Raises:
        DataFileError: naming the list file, when it is missing or empty.
    """
    path = pathlib.Path(root) / "ImageSets" / "Segmentation" / SPLIT_FILES[split]
    ids = files.read_bytes(path).decode().split()
    if not ids:
        raise files.DataFileError(path, "no ids listed")
    return ids


def read_example(root, example_id: str) -> dict:
    """Reads and checks one example.

    Args:
        root: the ``VOC2012`` folder.
        example_id: the id, e.g. ``"2007_000032"``.

    Returns:
        ``{"id": str, "image_bytes": bytes (the JPEG), "image": uint8 (H, W, 3),
        "label": uint8 (H, W)}``: classes ``0..20``, 255 on borders and void.

    Raises:
        DataFileError: naming the file at fault: missing, corrupt, a label of another
            size than the image, or label values other than ``0..20`` and 255.
    """
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
