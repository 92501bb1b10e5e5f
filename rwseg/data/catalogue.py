"""Datasets by name: :func:`dataset_info` and :func:`load_source`.

| name | where the data comes from | classes | ``validation`` (dev) split |
|---|---|---|---|
| ``synthetic`` | generated from a seed (``rwseg.data.synthetic``) | 6 | generated |
| ``stanford_background`` | local ``iccv09Data`` folder (``manual_dir``) | 8 | seeded split, and a seeded ``test`` split |
| ``voc2012`` | local ``VOCdevkit`` (``manual_dir``) or download | 21 | ``val.txt`` |
| ``voc2012_aug`` | local ``VOCdevkit`` + SBD ``benchmark_RELEASE`` (``manual_dir``); train = train_aug | 21 | ``val.txt`` |
| ``oxford_iiit_pet`` | TFDS catalogue ``oxford_iiit_pet`` | 2 | TFDS ``test`` |

Every source item is ``{"image": uint8 (H, W, 3), "label": int32 (H, W)}`` with
``IGNORE_INDEX = 255`` for pixels that count in no loss or metric: Stanford's unknown
(-1), VOC's object borders (255), the pets trimap's "not classified" band (value 3).
Pets trimap mapping: 1 (pet) -> 1, 2 (background) -> 0, 3 (border) -> 255.

TFDS's ``voc/2012`` has no segmentation masks, so ``voc2012`` uses rwseg's own builder
(:class:`rwseg.data.builders.RwsegVoc2012Segmentation`). Everything is written as
``array_record`` and read with TFDS data sources; no TensorFlow is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib

import numpy as np

from rwseg.data import sbd, stanford, synthetic, voc
from rwseg.data.constants import IGNORE_INDEX

try:  # POSIX: serialises dataset builds across processes (_prepare_lock)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

SPLITS = ("train", "validation")
# Datasets with a held-out test split besides the validation (dev) split: the benchmark
# reports it, and no choice is ever made on it.
TEST_SPLIT_DATASETS = ("stanford_background",)


def splits_of(name: str) -> tuple[str, ...]:
    """The splits :func:`load_source` serves for a dataset.

    Args:
        name: one of :data:`NAMES` or an alias.

    Returns:
        ``("train", "validation")``, plus ``"test"`` for the datasets of
        :data:`TEST_SPLIT_DATASETS` (Stanford Background's seeded test split).
    """
    return SPLITS + (("test",) if dataset_info(name).name in TEST_SPLIT_DATASETS else ())


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    Attributes:
        name: the canonical name, one of :data:`NAMES`.
        num_classes: the number of classes ``L`` (labels ``0..L-1``).
        class_names: ``L`` names, in label order.
        ignore_index: the label of pixels that count in no loss or metric (255).
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX


PET_CLASS_NAMES = ("background", "pet")

_INFOS = {
    "synthetic": DatasetInfo("synthetic", synthetic.NUM_CLASSES, synthetic.CLASS_NAMES),
    "stanford_background": DatasetInfo("stanford_background", stanford.NUM_CLASSES, stanford.CLASS_NAMES),
    "voc2012": DatasetInfo("voc2012", voc.NUM_CLASSES, voc.CLASS_NAMES),
    "voc2012_aug": DatasetInfo("voc2012_aug", voc.NUM_CLASSES, voc.CLASS_NAMES),
    "oxford_iiit_pet": DatasetInfo("oxford_iiit_pet", len(PET_CLASS_NAMES), PET_CLASS_NAMES),
}
NAMES = tuple(_INFOS)
ALIASES = {"voc/2012": "voc2012"}


def canonical_name(name: str) -> str:
    """Resolves aliases of dataset names.

    Args:
        name: a dataset name or an alias (``"voc/2012"``).

    Returns:
        The canonical name (``"voc2012"``); other names unchanged.
    """
    return ALIASES.get(name, name)


def dataset_info(name: str = "synthetic") -> DatasetInfo:
    """The static facts about a dataset.

    Args:
        name: one of :data:`NAMES`, or an alias (``"voc/2012"``).

    Returns:
        Its :class:`DatasetInfo`.

    Raises:
        ValueError: an unknown name.
    """
    try:
        return _INFOS[canonical_name(name)]
    except KeyError:
        raise ValueError(f"name: expected one of {list(NAMES)}, got {name!r}") from None


# ----------------------------------------------------------------------------- record adapters


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def _check_same_size(dataset: str, index: int, image: np.ndarray, label: np.ndarray) -> None:
    if image.shape[:2] != label.shape[:2]:
        raise ValueError(
            f"{dataset}[{index}]: label shape {label.shape[:2]} does not match image (H, W) = {image.shape[:2]}"
        )


def _adapt_rwseg(dataset: str, index: int, record: dict) -> dict:
    """rwseg builders: image (H, W, 3) uint8, label uint8 with 255 = ignore."""
    image, label = _as_rgb(record["image"]), np.asarray(record["label"])
    _check_same_size(dataset, index, image, label)
    return {"image": image, "label": label.astype(np.int32)}


_PET_LUT = np.full(256, -1, dtype=np.int32)
_PET_LUT[1], _PET_LUT[2], _PET_LUT[3] = 1, 0, IGNORE_INDEX


def _adapt_pet(dataset: str, index: int, record: dict) -> dict:
    """TFDS oxford_iiit_pet: trimap (H, W, 1) in {1 pet, 2 background, 3 border}."""
    image = _as_rgb(record["image"])
    mask = np.asarray(record["segmentation_mask"])
    if mask.ndim == 3:
        mask = mask[..., 0]
    _check_same_size(dataset, index, image, mask)
    label = _PET_LUT[mask.astype(np.uint8)]
    if (label < 0).any():
        bad = np.unique(mask[label < 0])[:5].tolist()
        raise ValueError(f"{dataset}[{index}]: trimap values {bad} are not in {{1, 2, 3}}")
    return {"image": image, "label": label}


class Source:
    """Random-access source of ``{"image": uint8 (H, W, 3), "label": int32 (H, W)}``.

    Wraps a TFDS data source (``len``, ``__getitem__``), converting each record; usable
    directly by ``grain.MapDataset.source``. Picklable when the wrapped source is. Built by
    :func:`load_source`.

    Args:
        name: the dataset's canonical name (its :class:`DatasetInfo` becomes ``.info``).
        split: ``"train"``, ``"validation"`` or ``"test"`` (:func:`splits_of`).
        records: the wrapped random-access records.
        adapter: ``adapter(dataset, index, record) -> {"image", "label"}`` converting one record.
    """

    def __init__(self, name: str, split: str, records, adapter):
        self.name, self.split, self.records, self._adapter = name, split, records, adapter
        self.info = dataset_info(name)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        index = int(index)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index: expected -{n} <= index < {n} for {self.name}/{self.split}, got {index}")
        return self._adapter(f"{self.name}/{self.split}", index % n, self.records[index % n])

    def __repr__(self) -> str:
        return f"Source({self.name!r}, {self.split!r}, {len(self)} examples)"


# ----------------------------------------------------------------------------- load_source


def _download_config(manual_dir):
    import tensorflow_datasets as tfds

    return tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir is not None else None)


@contextlib.contextmanager
def _prepare_lock(data_dir):
    """Hold an exclusive ``fcntl`` lock on ``.rwseg_prepare.lock`` two folders above
    ``data_dir`` while one process builds the dataset.

    For a builder with configs (``<root>/<dataset>/<config>/<version>``, e.g. Stanford
    Background) that is the dataset's folder, so different datasets build in parallel; for
    one without (``<root>/<dataset>/<version>``: voc2012, oxford_iiit_pet) it is the data
    root, so every build under that root takes its turn (coarser, still correct).

    Processes preparing the same dataset at once (parallel training runs, or the processes of
    a multi-host job on a shared filesystem) take turns: the first builds, the next ones find
    it built. Without it TFDS lets both build and the second one fails renaming its copy
    (``FileExistsError: ... already exists``). Remote data dirs (``gs://``) and platforms
    without ``fcntl`` are not locked."""
    if "://" in os.fspath(data_dir) or fcntl is None:
        yield None
        return
    lock_dir = pathlib.Path(os.fspath(data_dir)).parent.parent  # <root>/<dataset>/<config>/<version>
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / ".rwseg_prepare.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepared(make_builder, manual_dir):
    """``make_builder()``, built (once, under :func:`_prepare_lock`) unless already built.

    The builder is made again once the lock is held: a TFDS builder reads the dataset's
    metadata when it is made, so one made while another process was still building would
    see no splits."""
    with _prepare_lock(make_builder().data_dir):
        builder = make_builder()
        builder.download_and_prepare(download_config=_download_config(manual_dir))
    return builder


def _config_arg(builder_cls, config):
    """The config to pass to ``builder_cls``: its name when the class lists an equal one
    (TFDS refuses a custom config named like a listed config)."""
    listed = {c.name for c in builder_cls.BUILDER_CONFIGS}
    return config.name if config.name in listed else config


def _check_kwargs(name, kwargs, allowed):
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"builder_kwargs: {name!r} accepts {sorted(allowed)}, got unexpected {unknown}")


def load_source(name: str, split: str, *, data_dir=None, manual_dir=None, **builder_kwargs) -> Source:
    """A random-access source of one split, building the TFDS dataset on first use.

    Args:
      name: one of :data:`NAMES` (see the module docstring) or an alias (``"voc/2012"``).
      split: ``"train"``, ``"validation"`` (the dev split: every choice is made on it) or,
        for Stanford Background, ``"test"`` (reported only; :func:`splits_of`).
      data_dir: TFDS data dir (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``);
        the built ``array_record`` files are cached there per builder config.
      manual_dir: folder with the raw data for ``stanford_background`` (default
        ``$RWSEG_STANFORD_DIR``), ``voc2012`` and ``voc2012_aug`` (VOCdevkit and SBD's
        benchmark_RELEASE side by side).
      **builder_kwargs: ``synthetic``: ``num_train=256, num_validation=64,
        image_size=(64, 64), seed=0``; ``stanford_background``: ``num_validation=72,
        num_test=143, split_seed=0``.

    Returns:
      A :class:`Source`; ``source[i]`` is ``{"image": uint8 (H, W, 3), "label": int32 (H, W)}``.

    Building is done once per config and cached. Processes that build the same dataset at
    once (parallel runs; a multi-host job on a shared filesystem) take turns under a file
    lock in the dataset's folder: one builds, the others then read it.

    Raises:
      ValueError: unknown name or split.
      DataFileError: (a ``ValueError``) naming the file, when a raw image or label
        file is missing or corrupt during the build.
    """
    import tensorflow_datasets as tfds

    from rwseg.data import builders

    name = dataset_info(name).name
    if split not in splits_of(name):
        raise ValueError(f"split: expected one of {list(splits_of(name))} for {name}, got {split!r}")
    data_dir = os.fspath(data_dir) if data_dir is not None else None
    kw = dict(data_dir=data_dir, file_format="array_record")

    if name == "synthetic":
        _check_kwargs(name, builder_kwargs, ("num_train", "num_validation", "image_size", "seed"))
        config = builders.SyntheticConfig.make(**builder_kwargs)
        builder = _prepared(lambda: builders.RwsegSynthetic(config=_config_arg(builders.RwsegSynthetic, config), **kw), None)
        adapter = _adapt_rwseg
    elif name == "stanford_background":
        _check_kwargs(name, builder_kwargs, ("num_validation", "num_test", "split_seed"))
        if manual_dir is None and os.environ.get("RWSEG_STANFORD_DIR"):
            manual_dir = os.environ["RWSEG_STANFORD_DIR"]
        if manual_dir is None:
            raise ValueError(
                "manual_dir: stanford_background needs the iccv09Data folder (images/, labels/); "
                "got None and $RWSEG_STANFORD_DIR is unset"
            )
        stanford.list_ids(manual_dir)  # clear error before TFDS starts
        config = builders.StanfordConfig.make(manual_dir=manual_dir, **builder_kwargs)
        builder = _prepared(lambda: builders.RwsegStanfordBackground(config=_config_arg(builders.RwsegStanfordBackground, config), **kw),
                            manual_dir)
        adapter = _adapt_rwseg
    elif name == "voc2012":
        _check_kwargs(name, builder_kwargs, ())
        builder = _prepared(lambda: builders.RwsegVoc2012Segmentation(**kw), manual_dir)
        adapter = _adapt_rwseg
    elif name == "voc2012_aug":
        _check_kwargs(name, builder_kwargs, ())
        if manual_dir is None:
            raise ValueError("manual_dir: voc2012_aug needs a folder holding VOCdevkit/ and SBD's "
                             "benchmark_RELEASE/, got None")
        voc.find_root(manual_dir), sbd.find_root(manual_dir)  # clear errors before TFDS starts
        builder = _prepared(lambda: builders.RwsegVoc2012Aug(**kw), manual_dir)
        adapter = _adapt_rwseg
    else:  # oxford_iiit_pet
        _check_kwargs(name, builder_kwargs, ())
        builder = _prepared(lambda: tfds.builder("oxford_iiit_pet", **kw), manual_dir)
        adapter = _adapt_pet
        split = {"train": "train", "validation": "test"}[split]
    records = builder.as_data_source(split=split)
    return Source(name, "validation" if split == "test" else split, records, adapter)
