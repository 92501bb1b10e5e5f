"""The built-in synthetic dataset: determinism, classes, thin structures, colours."""

import numpy as np
import pytest

from rwseg.data import synthetic
from rwseg.data.synthetic import CLASS_NAMES, NUM_CLASSES, synthetic_example

SIZE = (48, 48)
WIRE = CLASS_NAMES.index("wire")


@pytest.fixture(scope="module")
def examples():
    return [synthetic_example(0, "train", i, SIZE) for i in range(40)]


def test_deterministic_by_seed_and_index():
    a = synthetic_example(7, "train", 3, SIZE)
    b = synthetic_example(7, "train", 3, SIZE)
    assert a["image"].dtype == np.uint8 and a["image"].shape == SIZE + (3,)
    assert a["label"].dtype == np.int32 and a["label"].shape == SIZE
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.parametrize(
    "other", [(8, "train", 3), (7, "train", 4), (7, "validation", 3)], ids=["seed", "index", "split"]
)
def test_different_seeds_indices_splits_differ(other):
    a = synthetic_example(7, "train", 3, SIZE)
    b = synthetic_example(*other, SIZE)
    assert not np.array_equal(a["label"], b["label"])
    assert not np.array_equal(a["image"], b["image"])


def test_non_square_size():
    ex = synthetic_example(0, "train", 0, (24, 40))
    assert ex["image"].shape == (24, 40, 3) and ex["label"].shape == (24, 40)


def test_all_classes_present_and_scenes_have_several(examples):
    labels = np.stack([e["label"] for e in examples])
    assert set(np.unique(labels)) == set(range(NUM_CLASSES))
    per_image = [len(np.unique(e["label"])) for e in examples]
    assert min(per_image) >= 2 and np.mean(per_image) >= 3


def test_thin_structures_present_and_lost_at_low_resolution(examples):
    """Wires are 1-2 px wide: erosion removes most of them, and so does 4x subsampling."""
    with_wire = [e["label"] == WIRE for e in examples if (e["label"] == WIRE).any()]
    assert len(with_wire) >= 0.6 * len(examples)
    wire = np.stack(with_wire)
    # 4-neighbour erosion (pixels whose 4 neighbours are wire too).
    inner = wire[:, 1:-1, 1:-1] & wire[:, :-2, 1:-1] & wire[:, 2:, 1:-1] & wire[:, 1:-1, :-2] & wire[:, 1:-1, 2:]
    assert inner.sum() < 0.35 * wire.sum()
    # A 4x-subsampled label map (nearest up again) recovers less than half of the wires.
    low = np.repeat(np.repeat(wire[:, ::4, ::4], 4, axis=1), 4, axis=2)
    assert (low & wire).sum() < 0.5 * wire.sum()


def test_classes_have_distinct_colours_but_not_trivially(examples):
    images = np.stack([e["image"] for e in examples]).reshape(-1, 3).astype(float)
    labels = np.stack([e["label"] for e in examples]).ravel()
    means = np.stack([images[labels == c].mean(0) for c in range(NUM_CLASSES)])
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert dist[~np.eye(NUM_CLASSES, dtype=bool)].min() > 40
    # Texture + noise: nearest-mean colour classification is good but not perfect.
    pred = np.argmin(((images[:, None] - means[None]) ** 2).sum(-1), axis=1)
    acc = (pred == labels).mean()
    assert 0.6 < acc < 0.99


def test_occlusion_objects_overlap(examples):
    """Later objects occlude earlier ones: some object is visible in several pieces or cut."""
    from scipy import ndimage

    pieces = [ndimage.label(e["label"] == c)[1] for e in examples for c in (1, 2, 3, 4)]
    assert max(pieces) >= 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        synthetic_example(0, "test", 0, SIZE)
    with pytest.raises(ValueError, match="image_size"):
        synthetic_example(0, "train", 0, (4, 64))
    assert synthetic.GENERATOR_VERSION >= 1
