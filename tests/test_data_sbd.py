"""VOC 2012 + SBD (train_aug): split lists, .mat labels and the TFDS builder, on small fake files."""

import numpy as np
import pytest
import scipy.io
from PIL import Image

import rwseg.data as D
from rwseg.data import sbd
from test_data_catalogue import write_fake_voc


def write_fake_sbd(root, voc_ids, rng):
    """benchmark_RELEASE/dataset with cls/*.mat (GTcls.Segmentation) and img/*.jpg.

    SBD train: two ids of its own, VOC train's first id (VOC's label must win) and VOC val's
    first id (must stay out of train_aug); SBD val: one id of its own."""
    base = root / "benchmark_RELEASE" / "dataset"
    (base / "cls").mkdir(parents=True)
    (base / "img").mkdir()
    own = ["2008_000001", "2008_000002", "2008_000003"]
    truth = {}
    for k, eid in enumerate(own + [voc_ids[0], voc_ids[3]]):
        h, w = 9 + k, 12
        seg = rng.integers(0, 21, (h, w)).astype(np.uint8)
        scipy.io.savemat(base / "cls" / f"{eid}.mat",
                         {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros((1, 1)), "CategoriesPresent": 1}})
        if eid in own:
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(img).save(base / "img" / f"{eid}.jpg")
            truth[eid] = (np.asarray(Image.open(base / "img" / f"{eid}.jpg").convert("RGB")), seg)
    (base / "train.txt").write_text("\n".join([own[0], own[1], voc_ids[0], voc_ids[3]]) + "\n")
    (base / "val.txt").write_text(own[2] + "\n")
    return base, own, truth


@pytest.fixture
def fake(tmp_path):
    rng = np.random.default_rng(0)
    voc_base, voc_ids, voc_truth = write_fake_voc(tmp_path / "raw", rng)
    sbd_base, own, sbd_truth = write_fake_sbd(tmp_path / "raw", voc_ids, rng)
    return tmp_path, voc_base, voc_ids, {**voc_truth, **sbd_truth}, sbd_base, own


def test_train_aug_list_and_labels(fake):
    tmp_path, voc_base, voc_ids, truth, sbd_base, own = fake
    assert sbd.find_root(tmp_path / "raw") == sbd_base == sbd.find_root(sbd_base.parent)
    ids = sbd.train_aug_ids(voc_base, sbd_base)
    # (SBD train ∪ SBD val ∪ VOC train) − VOC val
    assert ids == sorted(set(own) | set(voc_ids[:3]))
    assert voc_ids[3] not in ids and voc_ids[4] not in ids
    np.testing.assert_array_equal(sbd.read_label(sbd_base, own[1]), truth[own[1]][1])
    ex = sbd.read_example(voc_base, sbd_base, voc_ids[0])  # in both: VOC's mask, with its 255 border
    np.testing.assert_array_equal(ex["label"], truth[voc_ids[0]][1])
    assert (ex["label"][0] == 255).all()


def test_builder_round_trip(fake):
    tmp_path, voc_base, voc_ids, truth, sbd_base, own = fake
    train = D.load_source("voc2012_aug", "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "raw")
    val = D.load_source("voc2012_aug", "validation", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "raw")
    assert train.info.num_classes == 21 and train.info.class_names == D.dataset_info("voc2012").class_names
    expected = sorted(set(own) | set(voc_ids[:3]))
    assert len(train) == len(expected) and len(val) == 2
    for i, eid in enumerate(expected):
        img, lab = truth[eid]
        np.testing.assert_array_equal(train[i]["image"], img)
        np.testing.assert_array_equal(train[i]["label"], lab.astype(np.int32))
    for i, eid in enumerate(voc_ids[3:]):
        np.testing.assert_array_equal(val[i]["label"], truth[eid][1].astype(np.int32))


def test_bad_files_are_named(fake, tmp_path):
    _, voc_base, voc_ids, _, sbd_base, own = fake
    bad = sbd_base / "cls" / f"{own[0]}.mat"
    scipy.io.savemat(bad, {"GTcls": {"Segmentation": np.full((9, 12), 30, np.uint8)}})
    with pytest.raises(D.DataFileError, match="out of range") as e:
        sbd.read_example(voc_base, sbd_base, own[0])
    assert str(bad) in str(e.value)
    scipy.io.savemat(bad, {"other": np.zeros(3)})
    with pytest.raises(D.DataFileError, match="GTcls"):
        sbd.read_label(sbd_base, own[0])
    scipy.io.savemat(bad, {"GTcls": {"Segmentation": np.zeros((8, 12), np.uint8)}})  # image is 9 x 12
    with pytest.raises(D.DataFileError, match=str(bad)):
        sbd.read_example(voc_base, sbd_base, own[0])
    with pytest.raises(D.DataFileError, match="no SBD layout"):
        sbd.find_root(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="manual_dir"):
        D.load_source("voc2012_aug", "train", data_dir=tmp_path / "tfds")
