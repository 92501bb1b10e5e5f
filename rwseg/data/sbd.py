"""PASCAL VOC 2012 + SBD: the "train_aug" set of 10,582 images every seed paper trains on.

The Semantic Boundaries Dataset (Hariharan et al., "Semantic Contours from Inverse
Detectors", ICCV 2011; ``benchmark.tgz``) adds class masks for 11,355 VOC 2011 images:

    <sbd>/img/<id>.jpg
    <sbd>/cls/<id>.mat       MATLAB struct GTcls with field Segmentation: uint8 (H, W), 0..20
    <sbd>/train.txt, <sbd>/val.txt     (8,498 and 2,857 ids)

``<sbd>`` is the ``dataset`` folder of ``benchmark_RELEASE`` (:func:`find_root` also accepts
the folder holding ``benchmark_RELEASE/`` or ``dataset/``). The ``.mat`` files are read with
``scipy.io.loadmat``.

Splits (DeepLab's; mmsegmentation's ``voc_aug.py`` builds the same list):

* ``train`` = train_aug = (SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted (10,582 ids
  with the real data);
* ``validation`` = VOC 2012 val (1,449 ids).

Labels: an id with a VOC ``SegmentationClass`` mask takes it (with VOC's 255 borders),
otherwise SBD's mask (no borders); images come from VOC's ``JPEGImages`` when present, else
from SBD's ``img/``. Errors name the file.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np

from rwseg.data import files, voc

__all__ = ["find_root", "split_ids", "read_label", "train_aug_ids", "read_example", "SPLIT_FILES"]

SPLIT_FILES = {"train": "train.txt", "val": "val.txt"}


def find_root(path) -> pathlib.Path:
    """Finds SBD's ``dataset`` folder.

    Args:
        path: the ``dataset`` folder, ``benchmark_RELEASE``, or a folder holding either.

    Returns:
        The folder with ``cls/`` and ``train.txt``.

    Raises:
        DataFileError: naming ``path``, when none of the places has the layout.
    """
    path = pathlib.Path(path)
    for cand in (path, path / "dataset", path / "benchmark_RELEASE" / "dataset"):
        if (cand / "cls").is_dir() and (cand / "train.txt").is_file():
            return cand
    raise files.DataFileError(path, "no SBD layout found (expected cls/ and train.txt here, in dataset/ or in "
                                    "benchmark_RELEASE/dataset/)")


def split_ids(root, split: str) -> list[str]:
    """The ids of SBD's ``train`` or ``val`` list.

    Args:
        root: SBD's ``dataset`` folder.
        split: ``"train"`` or ``"val"``.

    Returns:
        The ids in file order.

    Raises:
        DataFileError: naming the list file, when it is missing or empty.
    """
    path = pathlib.Path(root) / SPLIT_FILES[split]
    ids = files.read_bytes(path).decode().split()
    if not ids:
        raise files.DataFileError(path, "no ids listed")
    return ids


def read_label(root, example_id: str) -> np.ndarray:
    """SBD's class mask of one image.

    Args:
        root: SBD's ``dataset`` folder.
        example_id: e.g. ``"2008_000002"``.

    Returns:
        uint8 (H, W), classes 0..20.

    Raises:
        DataFileError: naming the ``.mat`` file: missing, unreadable, without
            ``GTcls.Segmentation``, not 2-D, or with values outside 0..20.
    """
    import scipy.io

    path = pathlib.Path(root) / "cls" / f"{example_id}.mat"
    data = files.read_bytes(path)
    try:
        mat = scipy.io.loadmat(io.BytesIO(data))
        seg = np.asarray(mat["GTcls"]["Segmentation"][0, 0])
    except (ValueError, KeyError, IndexError, TypeError, NotImplementedError) as e:
        raise files.DataFileError(path, f"expected a MATLAB struct GTcls with a Segmentation field ({e})") from e
    if seg.ndim != 2:
        raise files.DataFileError(path, f"GTcls.Segmentation: expected a 2-D mask, got shape {seg.shape}")
    bad = (seg < 0) | (seg >= voc.NUM_CLASSES)
    if bad.any():
        raise files.DataFileError(path, f"label values {np.unique(seg[bad])[:5].tolist()} out of range: "
                                        f"expected 0..{voc.NUM_CLASSES - 1}")
    return seg.astype(np.uint8)


def train_aug_ids(voc_root, sbd_root) -> list[str]:
    """train_aug: (SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted.

    Args:
        voc_root: the ``VOC2012`` folder.
        sbd_root: SBD's ``dataset`` folder.

    Returns:
        The sorted ids (10,582 with the real data).
    """
    ids = set(split_ids(sbd_root, "train")) | set(split_ids(sbd_root, "val")) | set(voc.split_ids(voc_root, "train"))
    return sorted(ids - set(voc.split_ids(voc_root, "validation")))


def read_example(voc_root, sbd_root, example_id: str) -> dict:
    """Reads and checks one example of VOC + SBD.

    Args:
        voc_root: the ``VOC2012`` folder.
        sbd_root: SBD's ``dataset`` folder.
        example_id: the id.

    Returns:
        ``{"id", "image_bytes", "image": uint8 (H, W, 3), "label": uint8 (H, W)}``: VOC's mask
        when it has one (255 borders), else SBD's.

    Raises:
        DataFileError: naming the file at fault.
    """
    voc_root, sbd_root = pathlib.Path(voc_root), pathlib.Path(sbd_root)
    if (voc_root / "SegmentationClass" / f"{example_id}.png").is_file():
        return voc.read_example(voc_root, example_id)
    image_path = voc_root / "JPEGImages" / f"{example_id}.jpg"
    if not image_path.is_file():
        image_path = sbd_root / "img" / f"{example_id}.jpg"
    image_bytes = files.read_bytes(image_path)
    image = files.decode_rgb(image_path, image_bytes)
    label = read_label(sbd_root, example_id)
    files.check_label_shape(sbd_root / "cls" / f"{example_id}.mat", label, image.shape)
    return {"id": example_id, "image_bytes": image_bytes, "image": image, "label": label}
