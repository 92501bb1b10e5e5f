"""Evaluation predicts every image at its own size: a prediction does not depend on the
other images of the split (no padding to the largest one), and the metrics are those of
the per-image predictions."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwseg import data
from rwseg.train import parallel
from rwseg.train.config_files import load_config_file
from rwseg.train.evaluate import eval_batches, evaluate, shape_groups
from rwseg.train.state import create, merge

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
# variable sizes, as in Stanford Background (landscape and portrait)
SHAPES = [(16, 24), (24, 16), (16, 24)]


def _source(shapes, seed=0):
    """In-memory source of smooth random images with blocky labels (some 255)."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in shapes:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = np.kron(rng.integers(0, NUM_CLASSES, (h // 8, w // 8)), np.ones((8, 8), np.int64)).astype(np.int32)
        label[0, :3] = data.IGNORE_INDEX
        out.append({"image": image, "label": label})
    return out


@pytest.fixture(scope="module")
def model():
    config = load_config_file(str(ROOT / "rwseg" / "configs" / "baseline.py"), "smoke")
    config.eval_batches = 0
    config.eval_batch_size = 2
    setup = create(config, NUM_CLASSES, {})
    mesh = parallel.make_mesh()
    return config, setup, mesh, parallel.replicate(setup.state, mesh)


def _alone(setup, state, image):
    """Reference: the model on this one uint8 image at its own size -> (scores, argmax)."""
    x = jnp.asarray(data.normalize(image)[None])
    scores = np.asarray(jax.jit(lambda s, x: merge(setup.graphdef, s).predict(x))(state, x))[0]
    return scores, scores.argmax(-1)


def test_shape_groups_in_order_of_first_appearance():
    groups = shape_groups(_source(SHAPES))
    assert groups == [((16, 24), [0, 2]), ((24, 16), [1])]
    assert shape_groups(_source(SHAPES), limit=2) == [((16, 24), [0]), ((24, 16), [1])]


def test_eval_batches_are_unpadded_and_cover_each_image_once(model):
    config, _, mesh, _ = model
    src = _source(SHAPES)
    batches = list(eval_batches(config, src, mesh))
    seen = []
    for b in batches:
        assert len({b["image"].shape[1:3], b["label"].shape[1:]}) == 1
        for i in np.flatnonzero(b["valid"]):
            match = [j for j, ex in enumerate(src) if ex["label"].shape == b["label"][i].shape
                     and np.array_equal(ex["label"], b["label"][i]) and j not in seen]
            assert match, "an evaluated example is not an unpadded source example"
            seen.append(match[0])
        assert np.all(b["label"][~b["valid"]] == data.IGNORE_INDEX)
    assert sorted(seen) == list(range(len(src)))
    # eval_batches = N limits the evaluation to the first N * eval_batch_size images
    config = config.copy_and_resolve_references()
    config.eval_batches = 1
    assert sum(int(b["valid"].sum()) for b in eval_batches(config, src, mesh)) == config.eval_batch_size


def test_prediction_does_not_change_when_padding_is_added(model):
    """Each evaluated prediction is the model's prediction on that image alone (so it does
    not depend on the largest image of the split), and the metrics are those of these
    predictions; padding the image to the largest size (the old behaviour) changes it."""
    config, setup, mesh, state = model
    src = _source(SHAPES)
    result, panels = evaluate(config, setup.graphdef, state, mesh, src, num_classes=NUM_CLASSES, num_panels=len(src))
    order = [i for _, idx in shape_groups(src) for i in idx]  # panels come in evaluation order
    assert [tuple(s) for s in panels["sizes"]] == [SHAPES[i] for i in order]
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for k, i in enumerate(order):
        h, w = SHAPES[i]
        _, ref = _alone(setup, state, src[i]["image"])
        np.testing.assert_array_equal(panels["pred"][k, :h, :w], ref)
        assert np.all(panels["pred"][k, h:] == data.IGNORE_INDEX) and np.all(panels["pred"][k, :, w:] == data.IGNORE_INDEX)
        np.testing.assert_array_equal(panels["labels"][k, :h, :w], src[i]["label"])
        ok = src[i]["label"] != data.IGNORE_INDEX
        np.add.at(cm, (src[i]["label"][ok], ref[ok]), 1)
    tp, gt, pr = np.diag(cm), cm.sum(1), cm.sum(0)
    present = gt + pr - tp > 0
    np.testing.assert_allclose(result["mean_iou"], np.mean(tp[present] / (gt + pr - tp)[present]), rtol=1e-6)
    np.testing.assert_allclose(result["pixel_accuracy"], tp.sum() / cm.sum(), rtol=1e-6)

    # control: the test can fail — padding an image to the largest size (24x24) changes its scores
    scores, _ = _alone(setup, state, src[0]["image"])
    padded_scores, _ = _alone(setup, state, np.pad(src[0]["image"], ((0, 8), (0, 0), (0, 0))))
    assert np.max(np.abs(padded_scores[:16, :24] - scores)) > 1e-3


@pytest.mark.parametrize("method, multiple, changes", [("baseline", 1, {}), ("gcrf", 2, {}), ("rwn", 2, {}),
                                                       ("gcrf", 4, {"gcrf.layer.eval_downsample": 4})])
def test_pooling_methods_pad_to_their_factor_only(method, multiple, changes):
    """Images whose size the method's pooling factor does not divide (Stanford: 213 x 320 at
    1/4) are padded bottom/right to the next multiple, labels ignored there; others not at all.
    GCRF's factor at test time is its ``eval_downsample``."""
    config = load_config_file(method, "smoke")
    config.update_from_flattened_dict(changes)
    config.eval_batches = 0
    rng = np.random.default_rng(0)
    src = [{"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            "label": rng.integers(0, NUM_CLASSES, (h, w)).astype(np.int32)} for h, w in [(13, 18), (16, 16)]]
    seen = {b["image"].shape[1:3]: b for b in eval_batches(config, src, parallel.make_mesh())}
    padded = (-(-13 // multiple) * multiple, -(-18 // multiple) * multiple)
    assert set(seen) == {padded, (16, 16)}
    label = seen[padded]["label"][np.flatnonzero(seen[padded]["valid"])[0]]
    np.testing.assert_array_equal(label[:13, :18], src[0]["label"])
    assert np.all(label[13:] == data.IGNORE_INDEX) and np.all(label[:, 18:] == data.IGNORE_INDEX)
