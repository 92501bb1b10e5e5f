"""Catalogue datasets by name: oxford_iiit_pet (TFDS) and voc2012 (rwseg builder).

No network: ``tfds.testing.mock_data`` + data sources, and a tiny fake VOCdevkit.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.testing import mocking

import rwseg.data as D
from rwseg.data import voc

N = 5


class _FakeRecords:
    """Random records from the real builder's feature spec (TFDS's generator), with the
    dynamic dimensions of all features equal, as they are in real data."""

    def __init__(self, features, fix=None):
        self.gen = mocking.RandomFakeGenerator(features, N, constant_dynamic_shape=True)
        self.fix = fix or (lambda r: r)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return self.fix(self.gen[i])


def _trimap(record):
    record["segmentation_mask"] = record["segmentation_mask"] % 3 + 1  # valid trimap values
    return record


def _fake_source_fn(fix=None):
    def as_data_source(self, split, decoders=None, **kwargs):
        return _FakeRecords(self.info.features, fix)

    return as_data_source


def test_pet_mock_data_through_load_source_and_make_batches(tmp_path):
    with tfds.testing.mock_data(num_examples=N, as_data_source_fn=_fake_source_fn(_trimap)):
        src = D.load_source("oxford_iiit_pet", "validation", data_dir=tmp_path)
        assert len(src) == N and src.split == "validation"
        raw = src.records[1]
        ex = src[1]
        mask = raw["segmentation_mask"][..., 0]
        assert ex["image"].shape == raw["image"].shape and ex["image"].dtype == np.uint8
        expected = np.select([mask == 1, mask == 2, mask == 3], [1, 0, 255])
        np.testing.assert_array_equal(ex["label"], expected)
        batches = list(D.make_batches(src, batch_size=2, train=False, seed=0, shard_index=0, shard_count=1))
        assert len(batches) == 3 and batches[-1]["valid"].tolist() == [True, False]
        b = next(D.make_batches(src, batch_size=3, crop_size=(8, 8), train=True, seed=0, shard_index=0, shard_count=1))
        assert b["image"].shape == (3, 8, 8, 3) and set(np.unique(b["label"])) <= {0, 1, 255}


def test_pet_default_mock_reports_mismatched_and_bad_values(tmp_path):
    # TFDS's default mock draws every dynamic dimension independently: the adapter must
    # refuse an image/mask size mismatch with a message naming the example.
    with tfds.testing.mock_data(num_examples=N):
        src = D.load_source("oxford_iiit_pet", "train", data_dir=tmp_path)
        with pytest.raises(ValueError, match=r"oxford_iiit_pet/train\[0\]: label shape .* does not match"):
            src[0]
    with tfds.testing.mock_data(num_examples=N, as_data_source_fn=_fake_source_fn()):
        src = D.load_source("oxford_iiit_pet", "train", data_dir=tmp_path)
        with pytest.raises(ValueError, match=r"trimap values .* not in \{1, 2, 3\}"):
            src[0]


def test_voc_mock_data_through_load_source_and_make_batches(tmp_path):
    with tfds.testing.mock_data(num_examples=N, as_data_source_fn=_fake_source_fn()):
        src = D.load_source("voc/2012", "train", data_dir=tmp_path)
        assert src.name == "voc2012" and len(src) == N
        np.testing.assert_array_equal(src[2]["label"], src.records[2]["label"].astype(np.int32))
        b = next(D.make_batches(src, batch_size=2, train=False, seed=1, shard_index=1, shard_count=2))
        assert b["index"].tolist() == [1, 3]


def write_fake_voc(root, rng):
    """A tiny VOCdevkit/VOC2012 with palette labels and 255 borders (one grey JPEG)."""
    base = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True)
    palette = rng.integers(0, 256, 768).astype(np.uint8).tolist()
    truth = {}
    ids = [f"2007_{k:06d}" for k in range(5)]
    for k, eid in enumerate(ids):
        h, w = 10 + k, 14
        lab = rng.integers(0, 21, (h, w)).astype(np.uint8)
        lab[0, :] = 255  # object border
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pil = Image.fromarray(img).convert("L") if k == 2 else Image.fromarray(img)
        pil.save(base / "JPEGImages" / f"{eid}.jpg")
        p = Image.fromarray(lab, mode="P")
        p.putpalette(palette)
        p.save(base / "SegmentationClass" / f"{eid}.png")
        truth[eid] = (np.asarray(Image.open(base / "JPEGImages" / f"{eid}.jpg").convert("RGB")), lab)
    (base / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:3]) + "\n")
    (base / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[3:]) + "\n")
    return base, ids, truth


def test_voc_fake_devkit_round_trip(tmp_path):
    base, ids, truth = write_fake_voc(tmp_path / "raw", np.random.default_rng(0))
    for split, split_ids in (("train", ids[:3]), ("validation", ids[3:])):
        src = D.load_source("voc2012", split, data_dir=tmp_path / "tfds", manual_dir=tmp_path / "raw")
        assert len(src) == len(split_ids)
        for i, eid in enumerate(split_ids):
            img, lab = truth[eid]
            np.testing.assert_array_equal(src[i]["image"], img)  # grey JPEG comes back as RGB
            np.testing.assert_array_equal(src[i]["label"], lab.astype(np.int32))  # 255 border kept


def test_voc_bad_label_names_the_file(tmp_path):
    base, ids, _ = write_fake_voc(tmp_path / "raw", np.random.default_rng(1))
    bad = base / "SegmentationClass" / f"{ids[1]}.png"
    Image.fromarray(np.full((11, 14), 30, np.uint8), mode="L").save(bad)
    with pytest.raises(D.DataFileError, match="out of range") as err:
        D.load_source("voc2012", "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "raw")
    assert str(bad) in str(err.value)
    with pytest.raises(D.DataFileError, match="no VOC2012 layout"):
        voc.find_root(tmp_path)
