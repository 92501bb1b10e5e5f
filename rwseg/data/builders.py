"""TFDS builders for rwseg's own datasets, written as ``array_record`` (no TensorFlow).

* :class:`RwsegSynthetic` — the built-in synthetic dataset (``rwseg.data.synthetic``).
* :class:`RwsegStanfordBackground` — Stanford Background from a local ``iccv09Data`` folder.
* :class:`RwsegVoc2012Segmentation` — PASCAL VOC 2012 segmentation masks (TFDS's own
  ``voc/2012`` has boxes only) from a local ``VOCdevkit`` folder.
* :class:`RwsegVoc2012Aug` — VOC 2012 + SBD (train_aug / VOC val) from a local folder
  holding a ``VOCdevkit`` and SBD's ``benchmark_RELEASE`` (:mod:`rwseg.data.sbd`).

All three store ``{"image": PNG/JPEG bytes (H, W, 3), "label": uint8 (H, W) ZLIB tensor
(255 = ignore), "id": text}`` with ``disable_shuffling=True``, so record ``i`` of a split
is the ``i``-th generated example. Images are decoded by TFDS with PIL (no TensorFlow);
:mod:`rwseg.data.catalogue` converts records to the ``{"image", "label"}`` dicts of the
public API.

Build parameters live in the builder *config* and its name, e.g.
``g1_seed0_train256_val64_64x64``: TFDS caches each config in its own folder
(``<data_dir>/<builder>/<config>/<version>``), so a changed parameter never reuses stale
data. Bump ``VERSION`` (and the generator's ``GENERATOR_VERSION``) when the stored
format or the generator changes.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from rwseg.data import sbd, stanford, synthetic, voc

_ARRAY_RECORD = "array_record"


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _rgb_bytes(example: dict) -> bytes:
    """The original bytes when they decode to RGB (JPEG), else a lossless PNG of the RGB image."""
    with Image.open(io.BytesIO(example["image_bytes"])) as im:
        if im.mode == "RGB":
            return example["image_bytes"]
    return _png_bytes(example["image"])


def _features(image_format: str) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
            "label": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB),
            "id": tfds.features.Text(),
        }
    )


# ----------------------------------------------------------------------------- synthetic


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """Generation parameters of the synthetic dataset (all encoded in ``name``)."""

    num_train: int = 256
    num_validation: int = 64
    image_size: tuple[int, int] = (64, 64)
    seed: int = 0

    @classmethod
    def make(cls, *, num_train=256, num_validation=64, image_size=(64, 64), seed=0) -> "SyntheticConfig":
        """A config whose name encodes every parameter and the generator version.

        Args:
            num_train: the number of training examples.
            num_validation: the number of validation examples.
            image_size: ``(H, W)`` of every example.
            seed: the dataset seed (see :func:`rwseg.data.synthetic_example`).

        Returns:
            The config, named e.g. ``g1_seed0_train256_val64_64x64``.
        """
        h, w = (int(s) for s in image_size)
        name = f"g{synthetic.GENERATOR_VERSION}_seed{int(seed)}_train{int(num_train)}_val{int(num_validation)}_{h}x{w}"
        return cls(
            name=name,
            description=f"synthetic scenes {h}x{w}, seed {seed}",
            num_train=int(num_train),
            num_validation=int(num_validation),
            image_size=(h, w),
            seed=int(seed),
        )


class RwsegSynthetic(tfds.core.GeneratorBasedBuilder):
    """Synthetic scenes with curved boundaries, thin wires, occlusion and noise (seeded)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Generator version 1."}
    BUILDER_CONFIGS = [SyntheticConfig.make()]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=synthetic.__doc__,
            features=_features("png"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "validation": self._generate_examples("validation", cfg.num_validation),
        }

    def _generate_examples(self, split, n):
        cfg = self.builder_config
        for i in range(n):
            ex = synthetic.synthetic_example(cfg.seed, split, i, cfg.image_size)
            yield i, {"image": _png_bytes(ex["image"]), "label": ex["label"].astype(np.uint8), "id": f"{split}/{i}"}


# ----------------------------------------------------------------------------- stanford


@dataclasses.dataclass(eq=False)
class StanfordConfig(tfds.core.BuilderConfig):
    """Split parameters of Stanford Background; ``fingerprint`` identifies the folder content."""

    num_validation: int = 72
    num_test: int = 143
    split_seed: int = 0
    fingerprint: str = ""

    @classmethod
    def make(cls, *, manual_dir=None, num_validation=72, num_test=143, split_seed=0) -> "StanfordConfig":
        """A config whose name encodes the split and a fingerprint of the folder's files.

        Args:
            manual_dir: the ``iccv09Data`` folder (``None``: fingerprint ``"default"``).
            num_validation: the size of the seeded validation (dev) split.
            num_test: the size of the seeded test split (reported, never used to choose).
            split_seed: the seed of the split (:func:`rwseg.data.stanford.split_ids`).

        Returns:
            The config, named e.g. ``seed0_val72_test143_<fingerprint>``.
        """
        fp = stanford.fingerprint(manual_dir) if manual_dir is not None else "default"
        return cls(
            name=f"seed{int(split_seed)}_val{int(num_validation)}_test{int(num_test)}_{fp}",
            description=f"seeded split (seed {split_seed}, {num_validation} validation, {num_test} test images)",
            num_validation=int(num_validation),
            num_test=int(num_test),
            split_seed=int(split_seed),
            fingerprint=fp,
        )


class RwsegStanfordBackground(tfds.core.GeneratorBasedBuilder):
    """Stanford Background (iccv09Data) from ``manual_dir``, with a seeded train / validation (dev) / test split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [StanfordConfig.make()]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Extract iccv09Data.tar.gz (http://dags.stanford.edu/projects/scenedataset.html) and pass "
        "its folder (containing images/ and labels/) as manual_dir."
    )

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=stanford.__doc__, features=_features("jpeg"), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        cfg = self.builder_config
        splits = stanford.split_ids(stanford.list_ids(root), num_validation=cfg.num_validation,
                                   num_test=cfg.num_test, seed=cfg.split_seed)
        return {name: self._generate_examples(root, ids) for name, ids in splits.items()}

    def _generate_examples(self, root, ids):
        for example_id in ids:
            ex = stanford.read_example(root, example_id)
            yield example_id, {"image": _rgb_bytes(ex), "label": ex["label"], "id": example_id}


# ----------------------------------------------------------------------------- voc


class RwsegVoc2012Segmentation(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 segmentation (SegmentationClass masks, 21 classes, 255 = border).

    Reads ``manual_dir`` when given (the VOC2012 folder or a parent of ``VOCdevkit``),
    else downloads ``VOCtrainval_11-May-2012.tar`` (about 2 GB) through TFDS.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=voc.__doc__,
            features=_features("jpeg"),
            homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        # TFDS defaults the manual dir to <data_dir>/downloads/manual; `.manual_dir` would
        # raise when it is absent, so look at the attribute and download only then.
        manual = dl_manager._manual_dir  # pylint: disable=protected-access
        if manual is not None and manual.exists() and any(manual.iterdir()):
            base = manual
        else:
            base = dl_manager.download_and_extract(self.URL)
        root = voc.find_root(base)
        return {split: self._generate_examples(root, voc.split_ids(root, split)) for split in voc.SPLIT_FILES}

    def _generate_examples(self, root, ids):
        for example_id in ids:
            ex = voc.read_example(root, example_id)
            yield example_id, {"image": _rgb_bytes(ex), "label": ex["label"], "id": example_id}


# ----------------------------------------------------------------------------- voc + sbd


class RwsegVoc2012Aug(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 + SBD: ``train`` = train_aug (10,582 images), ``validation`` = VOC val (1,449).

    ``manual_dir`` holds both datasets: a VOC2012 folder (or ``VOCdevkit/VOC2012``, see
    :func:`rwseg.data.voc.find_root`) and SBD's ``benchmark_RELEASE/dataset`` (see
    :func:`rwseg.data.sbd.find_root`); nothing is downloaded.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put VOCtrainval_11-May-2012.tar (extracted: VOCdevkit/VOC2012) and SBD's benchmark.tgz "
        "(extracted: benchmark_RELEASE/dataset) in one folder and pass it as manual_dir."
    )

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=sbd.__doc__, features=_features("jpeg"),
                                     homepage="http://home.bharathh.info/pubs/codes/SBD/download.html",
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        voc_root, sbd_root = voc.find_root(root), sbd.find_root(root)
        return {"train": self._generate_examples(voc_root, sbd_root, sbd.train_aug_ids(voc_root, sbd_root)),
                "validation": self._generate_examples(voc_root, sbd_root, voc.split_ids(voc_root, "validation"))}

    def _generate_examples(self, voc_root, sbd_root, ids):
        for example_id in ids:
            ex = sbd.read_example(voc_root, sbd_root, example_id)
            yield example_id, {"image": _rgb_bytes(ex), "label": ex["label"], "id": example_id}
