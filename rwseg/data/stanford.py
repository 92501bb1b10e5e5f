"""Reader for the Stanford Background dataset in its ``iccv09Data`` layout.

Layout (Gould et al., ICCV 2009):

    <root>/images/<id>.jpg            RGB JPEG, about 320x240, variable sizes
    <root>/labels/<id>.regions.txt    H rows of W integers: 0..7 = class, negative = unknown

Classes: see :data:`CLASS_NAMES`. Unknown (any negative value) becomes
``IGNORE_INDEX = 255``. There is no official split; :func:`split_ids` makes a seeded train / validation (dev) / test one.
Every error names the offending file (:class:`rwseg.data.files.DataFileError`).
"""

from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np

from rwseg.data import files
from rwseg.data.constants import IGNORE_INDEX

CLASS_NAMES = ("sky", "tree", "road", "grass", "water", "building", "mountain", "foreground object")
NUM_CLASSES = len(CLASS_NAMES)


def list_ids(root) -> list[str]:
    """The example ids of a Stanford Background folder.

    Args:
        root: the ``iccv09Data`` folder.

    Returns:
        The sorted ids (file names without ``.jpg``) of ``<root>/images/*.jpg``.

    Raises:
        DataFileError: ``images/`` is missing or holds no ``.jpg``.
    """
    images = pathlib.Path(root) / "images"
    if not images.is_dir():
        raise files.DataFileError(images, "folder not found (expected the iccv09Data layout: images/, labels/)")
    ids = sorted(p.name[: -len(".jpg")] for p in images.iterdir() if p.name.endswith(".jpg"))
    if not ids:
        raise files.DataFileError(images, "no .jpg images found")
    return ids


def paths(root, example_id: str) -> tuple[pathlib.Path, pathlib.Path]:
    """The files of one example.

    Args:
        root: the ``iccv09Data`` folder.
        example_id: the id, e.g. ``"0000047"``.

    Returns:
        ``(image_path, label_path)``: ``images/<id>.jpg`` and ``labels/<id>.regions.txt``.
    """
    root = pathlib.Path(root)
    return root / "images" / f"{example_id}.jpg", root / "labels" / f"{example_id}.regions.txt"


def read_label_txt(path) -> np.ndarray:
    """Parses a ``.regions.txt`` label matrix.

    Args:
        path: the file: ``H`` rows of ``W`` integers, ``0..7`` a class, negative unknown.

    Returns:
        uint8 ``(H, W)``: classes ``0..7`` kept, unknown (negative) -> ``IGNORE_INDEX`` (255).

    Raises:
        DataFileError: naming ``path``, for a missing or empty file, ragged rows,
            non-integer text or values above 7.
    """
    text = files.read_bytes(path)
    rows = [r.split() for r in text.decode("ascii", errors="replace").splitlines() if r.strip()]
    if not rows:
        raise files.DataFileError(path, "empty label file")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise files.DataFileError(path, f"ragged label matrix: row lengths {sorted(widths)[:5]}")
    try:
        values = np.array(rows, dtype=np.int64)
    except ValueError as e:
        raise files.DataFileError(path, f"non-integer value in label matrix ({e})") from None
    if values.max() >= NUM_CLASSES:
        raise files.DataFileError(path, f"label value {values.max()} out of range: expected -1..{NUM_CLASSES - 1}")
    return np.where(values < 0, IGNORE_INDEX, values).astype(np.uint8)


def read_example(root, example_id: str) -> dict:
    """Reads and checks one example.

    Args:
        root: the ``iccv09Data`` folder.
        example_id: the id.

    Returns:
        ``{"id": str, "image_bytes": bytes (the JPEG), "image": uint8 (H, W, 3),
        "label": uint8 (H, W)}``; the image is decoded to check it.

    Raises:
        DataFileError: naming the file at fault: missing, corrupt, or a label whose
            ``(H, W)`` is not the image's.
    """
    image_path, label_path = paths(root, example_id)
    image_bytes = files.read_bytes(image_path)
    image = files.decode_rgb(image_path, image_bytes)
    label = read_label_txt(label_path)
    files.check_label_shape(label_path, label, image.shape)
    return {"id": example_id, "image_bytes": image_bytes, "image": image, "label": label}


def split_ids(ids, *, num_validation: int, num_test: int = 0, seed: int) -> dict[str, list[str]]:
    """A seeded train / validation (dev) / test split (``ids`` are sorted first, so their order
    does not matter).

    The validation split is the dev split: every choice (hyperparameters, variants, DenseCRF's
    parameters, checkpoints) is made on it. The test split is only reported, never used to
    choose. One permutation of the sorted ids: its first ``num_test`` ids are the test split,
    the next ``num_validation`` the validation split, the rest train.

    Args:
        ids: the example ids.
        num_validation: the size of the validation (dev) split, ``>= 0``.
        num_test: the size of the test split, ``>= 0``;
            ``num_validation + num_test < len(ids)``.
        seed: the seed of the permutation.

    Returns:
        ``{"train": [...], "validation": [...]}``, each sorted, and ``"test"`` when
        ``num_test > 0``.

    Raises:
        ValueError: ``num_validation`` or ``num_test`` out of range.
    """
    ids = sorted(ids)
    if num_validation < 0:
        raise ValueError(f"num_validation: expected >= 0, got {num_validation}")
    if num_test < 0:
        raise ValueError(f"num_test: expected >= 0, got {num_test}")
    if num_validation + num_test >= len(ids):
        raise ValueError(f"num_validation + num_test: expected < {len(ids)} (number of ids), "
                         f"got {num_validation} + {num_test}")
    perm = np.random.default_rng(seed).permutation(len(ids))
    test = sorted(ids[i] for i in perm[:num_test])
    val = sorted(ids[i] for i in perm[num_test:num_test + num_validation])
    train = sorted(ids[i] for i in perm[num_test + num_validation:])
    splits = {"train": train, "validation": val}
    if num_test:
        splits["test"] = test
    return splits


def fingerprint(root) -> str:
    """A short hash of the file names, sizes and mtimes under ``images/`` and ``labels/``.

    Part of the builder config name, so pointing at a changed folder rebuilds the data.

    Args:
        root: the ``iccv09Data`` folder.

    Returns:
        10 hexadecimal digits.
    """
    h = hashlib.sha1()
    root = pathlib.Path(root)
    for sub in ("images", "labels"):
        d = root / sub
        if not d.is_dir():
            continue
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            st = entry.stat()
            h.update(f"{sub}/{entry.name}:{st.st_size}:{int(st.st_mtime)};".encode())
    return h.hexdigest()[:10]
