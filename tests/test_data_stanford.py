"""Stanford Background reader and builder: fake iccv09Data folders and the real copy."""

import io
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

import rwseg.data as D
from rwseg.data import stanford

SIZES = [(12, 16), (16, 12), (12, 16), (10, 14), (12, 16), (14, 10)]


def write_fake(root, sizes=SIZES, seed=0):
    """A tiny iccv09Data folder; returns {id: (image uint8 as decoded by PIL, label int)}."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    truth = {}
    for k, (h, w) in enumerate(sizes):
        eid = f"{k:07d}"
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"{eid}.jpg", quality=90)
        lab = rng.integers(-1, 8, (h, w))
        np.savetxt(root / "labels" / f"{eid}.regions.txt", lab, fmt="%d")
        decoded = np.asarray(Image.open(root / "images" / f"{eid}.jpg").convert("RGB"))
        truth[eid] = (decoded, lab)
    return truth


def test_fake_folder_round_trip(tmp_path):
    truth = write_fake(tmp_path / "raw")
    kw = dict(data_dir=tmp_path / "tfds", manual_dir=tmp_path / "raw", num_validation=2, num_test=1, split_seed=1)
    train = D.load_source("stanford_background", "train", **kw)
    val = D.load_source("stanford_background", "validation", **kw)
    test = D.load_source("stanford_background", "test", **kw)
    assert (len(train), len(val), len(test)) == (3, 2, 1)
    split = stanford.split_ids(list(truth), num_validation=2, num_test=1, seed=1)
    for src, ids in ((train, split["train"]), (val, split["validation"]), (test, split["test"])):
        for i, eid in enumerate(ids):  # records keep the split's (sorted id) order
            ex = src[i]
            img, lab = truth[eid]
            np.testing.assert_array_equal(ex["image"], img)  # original JPEG bytes, same decoder
            np.testing.assert_array_equal(ex["label"], np.where(lab < 0, 255, lab))
            assert ex["label"].dtype == np.int32


def test_split_is_seeded_disjoint_and_covering():
    ids = [f"{k:07d}" for k in range(20)]
    a = stanford.split_ids(ids, num_validation=5, seed=0)
    b = stanford.split_ids(list(reversed(ids)), num_validation=5, seed=0)
    c = stanford.split_ids(ids, num_validation=5, seed=1)
    assert a == b
    assert a["validation"] != c["validation"]
    assert sorted(a["train"] + a["validation"]) == ids and len(a["validation"]) == 5
    with pytest.raises(ValueError, match="num_validation"):
        stanford.split_ids(ids, num_validation=20, seed=0)


def test_three_way_split_is_disjoint_covering_and_nested():
    ids = [f"{k:07d}" for k in range(30)]
    s = stanford.split_ids(ids, num_validation=6, num_test=9, seed=0)
    assert (len(s["train"]), len(s["validation"]), len(s["test"])) == (15, 6, 9)
    assert sorted(s["train"] + s["validation"] + s["test"]) == ids
    assert stanford.split_ids(list(reversed(ids)), num_validation=6, num_test=9, seed=0) == s
    # growing the dev split never moves a test photo: the test split depends on num_test only
    assert stanford.split_ids(ids, num_validation=3, num_test=9, seed=0)["test"] == s["test"]
    with pytest.raises(ValueError, match="num_validation \\+ num_test"):
        stanford.split_ids(ids, num_validation=20, num_test=10, seed=0)
    with pytest.raises(ValueError, match="num_test"):
        stanford.split_ids(ids, num_validation=2, num_test=-1, seed=0)


def test_test_split_only_where_the_dataset_has_one(tmp_path):
    assert D.splits_of("stanford_background") == ("train", "validation", "test")
    with pytest.raises(ValueError, match="split: expected one of \\['train', 'validation'\\] for synthetic"):
        D.load_source("synthetic", "test", data_dir=tmp_path)


def test_changed_folder_rebuilds(tmp_path):
    write_fake(tmp_path / "raw")
    kw = dict(data_dir=tmp_path / "tfds", manual_dir=tmp_path / "raw", num_validation=2, num_test=0)
    assert len(D.load_source("stanford_background", "train", **kw)) == 4
    img = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "raw" / "images" / "0000099.jpg")
    np.savetxt(tmp_path / "raw" / "labels" / "0000099.regions.txt", np.zeros((8, 8)), fmt="%d")
    assert len(D.load_source("stanford_background", "train", **kw)) == 5


def _corrupt_jpg(root, eid):
    path = root / "images" / f"{eid}.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated JPEG
    return path


def _missing_label(root, eid):
    path = root / "labels" / f"{eid}.regions.txt"
    path.unlink()
    return path


def _wrong_size_label(root, eid):
    path = root / "labels" / f"{eid}.regions.txt"
    np.savetxt(path, np.zeros((5, 7)), fmt="%d")
    return path


def _bad_value_label(root, eid):
    path = root / "labels" / f"{eid}.regions.txt"
    lab = np.loadtxt(path, dtype=int)
    lab[0, 0] = 8
    np.savetxt(path, lab, fmt="%d")
    return path


def _ragged_label(root, eid):
    path = root / "labels" / f"{eid}.regions.txt"
    path.write_text("0 1 2\n3 4\n")
    return path


@pytest.mark.parametrize(
    "damage, message",
    [
        (_corrupt_jpg, "corrupt"),
        (_missing_label, "file not found"),
        (_wrong_size_label, "does not match"),
        (_bad_value_label, "out of range"),
        (_ragged_label, "ragged"),
    ],
)
def test_bad_files_raise_errors_naming_the_file(tmp_path, damage, message):
    write_fake(tmp_path / "raw")
    bad = damage(tmp_path / "raw", "0000003")
    with pytest.raises(D.DataFileError, match=message) as err:
        D.load_source(
            "stanford_background", "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "raw", num_validation=2, num_test=0
        )
    assert str(bad) in str(err.value) and err.value.path == str(bad)


def test_missing_folder_errors(tmp_path):
    with pytest.raises(D.DataFileError, match="images"):
        D.load_source("stanford_background", "train", data_dir=tmp_path, manual_dir=tmp_path / "nope")
    env = os.environ.pop("RWSEG_STANFORD_DIR", None)
    try:
        with pytest.raises(ValueError, match="manual_dir"):
            D.load_source("stanford_background", "train", data_dir=tmp_path)
    finally:
        if env is not None:
            os.environ["RWSEG_STANFORD_DIR"] = env


# ----------------------------------------------------------------------------- real copy


def _real_ids(stanford_dir, k=4):
    ids = pathlib.Path(stanford_dir, "ids.txt").read_text().split()
    return ids[:: len(ids) // k][:k]


@pytest.mark.data
def test_real_examples_match_the_png_labels_and_horizon_sizes(stanford_dir):
    sizes = {}
    for line in pathlib.Path(stanford_dir, "horizons.txt").read_text().splitlines():
        eid, w, h, _ = line.split()
        sizes[eid] = (int(h), int(w))
    for eid in _real_ids(stanford_dir):
        ex = stanford.read_example(stanford_dir, eid)
        assert ex["image"].shape == sizes[eid] + (3,)
        png = np.asarray(Image.open(pathlib.Path(stanford_dir, "labels_png", f"{eid}.png")))
        np.testing.assert_array_equal(ex["label"], png)  # independent lossless conversion


@pytest.mark.data
def test_real_subset_builds_and_reads(stanford_dir, tmp_path):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "labels").mkdir()
    ids = _real_ids(stanford_dir)
    for eid in ids:  # symlinks: nothing is copied
        (raw / "images" / f"{eid}.jpg").symlink_to(pathlib.Path(stanford_dir, "images", f"{eid}.jpg"))
        (raw / "labels" / f"{eid}.regions.txt").symlink_to(pathlib.Path(stanford_dir, "labels", f"{eid}.regions.txt"))
    src = D.load_source("stanford_background", "validation", data_dir=tmp_path / "tfds", manual_dir=raw, num_validation=1, num_test=0)
    eid = stanford.split_ids(ids, num_validation=1, seed=0)["validation"][0]
    ex = src[0]
    png = np.asarray(Image.open(pathlib.Path(stanford_dir, "labels_png", f"{eid}.png")))
    np.testing.assert_array_equal(ex["label"], png)
    ref = np.asarray(Image.open(io.BytesIO(pathlib.Path(stanford_dir, "images", f"{eid}.jpg").read_bytes())).convert("RGB"))
    np.testing.assert_array_equal(ex["image"], ref)
    batch = next(D.make_batches(src, batch_size=2, train=False, seed=0, pad_size=(320, 320), shard_index=0, shard_count=1))
    assert batch["image"].shape == (2, 320, 320, 3) and batch["valid"].tolist() == [True, False]
