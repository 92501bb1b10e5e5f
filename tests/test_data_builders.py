"""TFDS array_record builders: synthetic round trip, config-encoded caching, catalogue names."""

import pathlib
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import rwseg.data as D
from rwseg.data import builders
from rwseg.data.synthetic import synthetic_example

KW = dict(num_train=6, num_validation=3, image_size=(16, 20), seed=5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def test_synthetic_round_trip_exact(data_dir):
    for split, n in (("train", 6), ("validation", 3)):
        src = D.load_source("synthetic", split, data_dir=data_dir, **KW)
        assert len(src) == n
        for i in range(n):
            ex, ref = src[i], synthetic_example(5, split, i, (16, 20))
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (16, 20, 3)
            assert ex["label"].dtype == np.int32 and ex["label"].shape == (16, 20)
            np.testing.assert_array_equal(ex["image"], ref["image"])  # PNG is lossless
            np.testing.assert_array_equal(ex["label"], ref["label"])
    assert "tensorflow" not in sys.modules  # written and read without TensorFlow


def test_written_as_array_record_and_readable_by_plain_tfds(data_dir):
    D.load_source("synthetic", "train", data_dir=data_dir, **KW)
    config = builders.SyntheticConfig.make(**KW)
    folder = pathlib.Path(data_dir) / "rwseg_synthetic" / config.name
    assert list(folder.glob("*/*.array_record-*")), "expected array_record shards"
    src = tfds.data_source(f"rwseg_synthetic/{config.name}", split="validation", data_dir=data_dir, download=False)
    rec = src[2]
    np.testing.assert_array_equal(rec["label"], synthetic_example(5, "validation", 2, (16, 20))["label"])
    assert rec["id"] in (b"validation/2", "validation/2")


@pytest.mark.parametrize(
    "change", [dict(seed=6), dict(num_train=7), dict(image_size=(16, 24))], ids=["seed", "num_train", "size"]
)
def test_changed_config_never_reuses_stale_data(data_dir, change):
    base = D.load_source("synthetic", "train", data_dir=data_dir, **KW)
    kw = {**KW, **change}
    other = D.load_source("synthetic", "train", data_dir=data_dir, **kw)
    assert builders.SyntheticConfig.make(**kw).name != builders.SyntheticConfig.make(**KW).name
    assert len(other) == kw["num_train"]
    ref = synthetic_example(kw["seed"], "train", 0, kw["image_size"])
    np.testing.assert_array_equal(other[0]["label"], ref["label"])
    if "num_train" not in change:  # same index, different generation parameters
        assert not np.array_equal(other[0]["image"][:16, :20], base[0]["image"][:16, :20])


def test_default_config_builds_in_seconds(tmp_path):
    """The default (main job) dataset: 256 + 64 images of 64x64 (the config TFDS lists)."""
    src = D.load_source("synthetic", "validation", data_dir=tmp_path)
    assert len(src) == 64 and src[0]["image"].shape == (64, 64, 3)
    assert len(D.load_source("synthetic", "train", data_dir=tmp_path)) == 256
    np.testing.assert_array_equal(src[9]["label"], synthetic_example(0, "validation", 9, (64, 64))["label"])


def test_source_index_errors_and_repr(data_dir):
    src = D.load_source("synthetic", "validation", data_dir=data_dir, **KW)
    np.testing.assert_array_equal(src[-1]["label"], src[2]["label"])
    with pytest.raises(IndexError, match="index"):
        src[3]
    assert "synthetic" in repr(src)


def test_dataset_info_names():
    assert D.IGNORE_INDEX == 255
    assert D.dataset_info().name == "synthetic"
    expected = {"synthetic": 6, "stanford_background": 8, "voc2012": 21, "oxford_iiit_pet": 2}
    for name, k in expected.items():
        info = D.dataset_info(name)
        assert info.num_classes == k == len(info.class_names) and info.ignore_index == 255
    assert D.dataset_info("stanford_background").class_names[0] == "sky"
    with pytest.raises(ValueError, match="name: expected one of"):
        D.dataset_info("cityscapes")


def test_load_source_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split"):
        D.load_source("synthetic", "test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="name"):
        D.load_source("mnist", "train", data_dir=tmp_path)
    with pytest.raises(TypeError, match="num_images"):
        D.load_source("synthetic", "train", data_dir=tmp_path, num_images=3)


def test_build_holds_the_prepare_lock(tmp_path, monkeypatch):
    """Parallel runs (or hosts on a shared filesystem) building the same dataset take turns:
    while one process builds, the lock file in the dataset's folder is held, so a second
    process's lock attempt blocks (here: fails, non-blocking) until the build is done."""
    import fcntl

    seen = []
    original = builders.RwsegSynthetic.download_and_prepare

    def checking(self, *args, **kwargs):
        lock = pathlib.Path(self.data_dir).parent.parent / ".rwseg_prepare.lock"
        with open(lock, "a") as other:  # another open file description, as another process has
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(lock)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(builders.RwsegSynthetic, "download_and_prepare", checking)
    src = D.load_source("synthetic", "train", data_dir=tmp_path, **KW)
    assert len(src) == 6 and seen == [tmp_path / "rwseg_synthetic" / ".rwseg_prepare.lock"]
    with open(seen[0], "a") as other:  # released afterwards
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_build_finished_by_another_process_while_waiting_is_read(tmp_path, monkeypatch):
    """A process that waited on the lock while another built the dataset reads that build
    (its builder is made again once the lock is held; one made before would see no splits)."""
    import contextlib

    from rwseg.data import catalogue

    config = builders.SyntheticConfig.make(**KW)

    @contextlib.contextmanager
    def other_process_builds_first(data_dir):
        other = builders.RwsegSynthetic(config=config, data_dir=tmp_path, file_format="array_record")
        other.download_and_prepare()
        yield None

    monkeypatch.setattr(catalogue, "_prepare_lock", other_process_builds_first)
    src = D.load_source("synthetic", "validation", data_dir=tmp_path, **KW)
    assert len(src) == 3
    np.testing.assert_array_equal(src[2]["label"], synthetic_example(5, "validation", 2, (16, 20))["label"])
