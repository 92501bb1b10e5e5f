"""Tests of rwseg.metrics against hand-computed values and numpy / scipy.ndimage oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from scipy import ndimage

from rwseg import metrics as M

IGN = 255


# --------------------------------------------------------------------------- references


def ref_confusion(pred, labels, n, ignore=IGN):
    cm = np.zeros((n, n), np.int64)
    for p, l in zip(np.ravel(pred), np.ravel(labels)):
        if l < 0 or l == ignore or l >= n:
            continue
        cm[l, p] += 1
    return cm


def ref_boundary(labels, ignore=IGN, void=False):
    h, w = labels.shape
    ok = (labels >= 0) & (labels != ignore) if ignore is not None else np.ones((h, w), bool)
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            if not ok[y, x]:
                continue
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w:
                    if (ok[yy, xx] and labels[yy, xx] != labels[y, x]) or (void and not ok[yy, xx]):
                        out[y, x] = True
    return out


def ref_within(mask, radius):
    if not mask.any():
        return np.zeros_like(mask, bool)
    return ndimage.distance_transform_edt(~mask) <= radius


def random_labels(rng, shape, n, p_ignore=0.1, blocky=True):
    if blocky:  # piecewise-constant regions so that boundaries are not everywhere
        small = rng.integers(0, n, size=(shape[0] // 3 + 1, shape[1] // 3 + 1))
        lab = np.kron(small, np.ones((3, 3), int))[: shape[0], : shape[1]]
    else:
        lab = rng.integers(0, n, size=shape)
    lab = lab.copy()
    lab[rng.random(shape) < p_ignore] = IGN
    return lab.astype(np.int32)


# --------------------------------------------------------------------------- confusion matrix / summarize


def test_confusion_matrix_hand_computed():
    labels = np.array([[0, 0, 1], [1, 2, IGN], [-1, -7, 2]], np.int32)
    pred = np.array([[0, 1, 1], [0, 2, 0], [1, 2, 2]], np.int32)
    # negative labels and 255 are skipped
    expected = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 2]])
    cm = M.confusion_matrix(pred, labels, 3)
    np.testing.assert_array_equal(cm, expected)
    assert jnp.issubdtype(cm.dtype, jnp.integer)


def test_confusion_matrix_random_batched_summable_jit():
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 6, size=(2, 3, 6, 5)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.1] = IGN
    pred = rng.integers(0, 6, size=labels.shape).astype(np.int32)
    ref = ref_confusion(pred, labels, 6)
    np.testing.assert_array_equal(M.confusion_matrix(pred, labels, 6), ref)
    jitted = jax.jit(M.confusion_matrix, static_argnums=(2,))
    np.testing.assert_array_equal(jitted(pred, labels, 6), ref)
    parts = sum(np.asarray(M.confusion_matrix(pred[i, j], labels[i, j], 6)) for i in range(2) for j in range(3))
    np.testing.assert_array_equal(parts, ref)
    per_image = jax.vmap(lambda p, l: M.confusion_matrix(p, l, 6))(pred.reshape(6, 6, 5), labels.reshape(6, 6, 5))
    np.testing.assert_array_equal(per_image.sum(0), ref)


def test_confusion_matrix_ignore_index_none():
    labels = np.array([[0, 1], [1, -2]], np.int32)
    pred = np.zeros((2, 2), np.int32)
    np.testing.assert_array_equal(M.confusion_matrix(pred, labels, 2, ignore_index=None), [[1, 0], [2, 0]])


def test_confusion_matrix_pred_out_of_range():
    labels = np.zeros((2, 3), np.int32)
    pred = np.array([[0, 1, 5], [0, -1, 0]], np.int32)
    with pytest.raises(ValueError, match=r"pred: expected class indices in \[0, 3\)"):
        M.confusion_matrix(pred, labels, 3)
    # under jit: dropped silently, reported by the checked mode
    cm = jax.jit(M.confusion_matrix, static_argnums=(2,))(pred, labels, 3)
    assert int(cm.sum()) == 4
    checked = checkify.checkify(jax.jit(lambda p, l: M.confusion_matrix(p, l, 3, checked=True)))
    err, _ = checked(pred, labels)
    with pytest.raises(checkify.JaxRuntimeError, match="pred: expected class indices"):
        err.throw()
    err, cm = checked(np.zeros_like(pred), labels)
    err.throw()
    assert int(cm[0, 0]) == 6


def test_confusion_matrix_labels_out_of_range():
    """Issue 9.7: ``checked=True`` checked pred but silently dropped labels >= num_classes."""
    labels = np.array([[0, 1, 3], [IGN, -1, 2]], np.int32)
    pred = np.zeros((2, 3), np.int32)
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 3\) or ignored labels "
                                         r"\(negative or ignore_index = 255\), got out-of-range values \[3\]"):
        M.confusion_matrix(pred, labels, 3)
    with pytest.raises(ValueError, match=r"labels: .*\(negative\), got out-of-range values \[3, 255\]"):
        M.confusion_matrix(pred, labels, 3, ignore_index=None)
    # ignore_index inside the class range is ignored, not an error
    np.testing.assert_array_equal(M.confusion_matrix(pred, np.array([[0, 1, 2], [2, -1, 0]], np.int32), 3, ignore_index=2),
                                  [[2, 0, 0], [1, 0, 0], [0, 0, 0]])
    # under jit: dropped (documented), reported by the checked mode
    cm = jax.jit(M.confusion_matrix, static_argnums=(2,))(pred, labels, 3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [1, 0, 0], [1, 0, 0]])
    checked = checkify.checkify(jax.jit(lambda p, l: M.confusion_matrix(p, l, 3, checked=True)))
    err, _ = checked(pred, labels)
    with pytest.raises(checkify.JaxRuntimeError, match="labels: expected class indices in .* largest non-ignored label of 3"):
        err.throw()
    err, cm = checked(pred, np.where(labels == 3, IGN, labels))
    err.throw()
    np.testing.assert_array_equal(cm, [[1, 0, 0], [1, 0, 0], [1, 0, 0]])
    # both bad: each argument is named
    err, _ = checked(pred + 5, labels)
    with pytest.raises(checkify.JaxRuntimeError, match="pred: expected class indices"):
        err.throw()


def test_confusion_matrix_counts_out_of_range_pixels_under_jit_and_summarize_reports_them():
    """Issue 29: under jit an out-of-range prediction or label was dropped without a trace.
    ``return_out_of_range`` counts them (ignored pixels never count, whatever their
    prediction), the counts add up over batches and devices like ``cm``, and ``summarize``
    reports them with NaN scores."""
    labels = np.array([[0, 1, 3], [IGN, -1, 2], [1, 4, 0]], np.int32)
    pred = np.array([[0, 7, 1], [9, -3, 2], [-1, 0, 0]], np.int32)
    f = jax.jit(lambda p, l: M.confusion_matrix(p, l, 3, return_out_of_range=True))
    cm, oor = f(pred, labels)
    # labels 3 and 4 out of range; predictions 7 and -1 on counted labels (9, -3 sit on ignored pixels)
    np.testing.assert_array_equal(oor, [2, 2])
    np.testing.assert_array_equal(cm, [[2, 0, 0], [0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(cm, jax.jit(M.confusion_matrix, static_argnums=(2,))(pred, labels, 3))
    # summable: per-row counts add up to the whole image's, also through a batched vmap + sum
    rows = [f(pred[i], labels[i]) for i in range(3)]
    np.testing.assert_array_equal(sum(np.asarray(r[1]) for r in rows), oor)
    np.testing.assert_array_equal(sum(np.asarray(r[0]) for r in rows), cm)
    bcm, boor = jax.vmap(f)(pred, labels)
    np.testing.assert_array_equal(boor.sum(0), oor)
    s = jax.jit(M.summarize)(cm, out_of_range=oor)
    assert int(s["out_of_range_labels"]) == 2 and int(s["out_of_range_pred"]) == 2
    for key in ("mean_iou", "fw_iou", "pixel_accuracy", "mean_accuracy"):
        assert np.isnan(s[key]), key
    assert np.all(np.isnan(s["per_class_iou"]))
    # clean input: zero counts, the same scores as without them
    good = np.where((labels >= 3) & (labels != IGN), 0, labels), np.clip(pred, 0, 2)
    cm, oor = f(good[1], good[0])
    np.testing.assert_array_equal(oor, [0, 0])
    s, plain = M.summarize(cm, out_of_range=oor), M.summarize(cm)
    assert int(s["out_of_range_pred"]) == 0
    for key, value in plain.items():
        np.testing.assert_array_equal(s[key], value)
    with pytest.raises(ValueError, match=r"out_of_range: expected shape"):
        M.summarize(cm, out_of_range=np.zeros(3, np.int32))
    with pytest.raises(TypeError, match=r"out_of_range: expected an integer"):
        M.summarize(cm, out_of_range=np.zeros(2))


def test_summarize_hand_computed():
    # class 3 absent from both -> left out; class 2 predicted but never true -> IoU 0, no accuracy
    cm = np.array([[3, 1, 0, 0], [2, 4, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    s = M.summarize(cm)
    iou = np.array([3 / 6, 4 / 8, 0.0, np.nan])
    np.testing.assert_allclose(s["per_class_iou"], iou)
    np.testing.assert_allclose(s["mean_iou"], np.mean(iou[:3]))
    np.testing.assert_allclose(s["pixel_accuracy"], 7 / 11)
    np.testing.assert_allclose(s["per_class_accuracy"], [3 / 4, 4 / 7, np.nan, np.nan])
    np.testing.assert_allclose(s["mean_accuracy"], (3 / 4 + 4 / 7) / 2)
    np.testing.assert_allclose(s["fw_iou"], (4 * 0.5 + 7 * 0.5) / 11)


def test_summarize_random_against_numpy_and_jit():
    rng = np.random.default_rng(1)
    cm = rng.integers(0, 20, size=(5, 5))
    cm[4, :] = 0
    cm[:, 4] = 0
    s = jax.jit(M.summarize)(cm)
    tp = np.diag(cm).astype(float)
    gt, pr = cm.sum(1), cm.sum(0)
    iou = tp[:4] / (gt + pr - tp)[:4]
    np.testing.assert_allclose(s["mean_iou"], iou.mean())
    np.testing.assert_allclose(s["fw_iou"], (gt[:4] * iou).sum() / gt.sum())
    np.testing.assert_allclose(s["mean_accuracy"], (tp[:4] / gt[:4]).mean())
    assert np.isnan(s["per_class_iou"][4])
    assert np.isnan(M.summarize(np.zeros((3, 3), int))["mean_iou"])


# --------------------------------------------------------------------------- boundaries and distances


@pytest.mark.parametrize("void", [False, True])
def test_boundary_mask_against_loop(void):
    rng = np.random.default_rng(2)
    labels = random_labels(rng, (9, 11), 3)
    labels[0, 0] = -1
    got = M.boundary_mask(labels, void_boundaries=void)
    np.testing.assert_array_equal(got, ref_boundary(labels, void=void))


def test_boundary_mask_hand():
    labels = np.array([[0, 0, 1], [0, 0, 1], [IGN, 2, 2]], np.int32)
    expected = np.array([[0, 1, 1], [0, 1, 1], [0, 1, 1]], bool)
    expected[1, 0] = False
    np.testing.assert_array_equal(M.boundary_mask(labels), expected)
    # with void boundaries, (1, 0) touches the ignored (2, 0)
    expected[1, 0] = True
    np.testing.assert_array_equal(M.boundary_mask(labels, void_boundaries=True), expected)


@pytest.mark.parametrize("radius", [0, 1, 1.5, 2, 3.2, 6])
def test_within_distance_against_edt(radius):
    rng = np.random.default_rng(3)
    for density in (0.02, 0.1):
        mask = rng.random((13, 10)) < density
        np.testing.assert_array_equal(jax.jit(M.within_distance, static_argnames="radius")(mask, radius=radius),
                                      ref_within(mask, radius))
    yy, xx = np.mgrid[-7:8, -7:8]
    struct = yy**2 + xx**2 <= radius**2  # disk structuring element
    single = np.zeros((12, 12), bool)
    single[5, 6] = True
    np.testing.assert_array_equal(M.within_distance(single, radius=radius),
                                  ndimage.binary_dilation(single, structure=struct))
    assert not M.within_distance(np.zeros((4, 5), bool), radius=radius).any()


def ref_trimap(pred, labels, widths):
    b = ref_boundary(labels)
    ok = (labels >= 0) & (labels != IGN)
    out = []
    for w in widths:
        band = ref_within(b, w) & ok
        out.append([(band & (pred != labels)).sum(), band.sum()])
    return np.array(out)


def test_trimap_counts_against_scipy_and_accumulate():
    rng = np.random.default_rng(4)
    labels = np.stack([random_labels(rng, (12, 10), 4) for _ in range(3)])
    pred = np.where(rng.random(labels.shape) < 0.3, rng.integers(0, 4, labels.shape), labels).astype(np.int32)
    pred[pred == IGN] = 0
    widths = (0, 1, 2.5, 4)
    refs = [ref_trimap(pred[i], labels[i], widths) for i in range(3)]
    jitted = jax.jit(lambda p, l: M.trimap_counts(p, l, widths=widths))
    per_image = jax.vmap(jitted)(pred, labels)  # (3, K, 2): one image per call
    for i in range(3):
        np.testing.assert_array_equal(per_image[i], refs[i])
    total = sum(refs)
    np.testing.assert_array_equal(jitted(pred, labels), total)  # leading batch dims are summed
    rates = jax.jit(lambda p, l: M.trimap_error(p, l, widths=widths))(pred, labels)
    np.testing.assert_allclose(rates, total[:, 0] / total[:, 1])
    np.testing.assert_allclose(M.summarize_trimap(total), total[:, 0] / total[:, 1])
    # perfect prediction has no error; bands grow with the width
    assert np.all(np.asarray(jitted(labels, labels))[:, 0] == 0)
    assert np.all(np.diff(total[:, 1]) >= 0)


def test_trimap_hand():
    labels = np.zeros((5, 6), np.int32)
    labels[:, 3:] = 1  # vertical edge between columns 2 and 3
    pred = labels.copy()
    pred[0, 0] = 1  # distance 2 from the boundary (column 2)
    pred[4, 2] = 0 + 1  # on the boundary
    counts = np.asarray(M.trimap_counts(pred, labels, widths=(0, 1, 2)))
    np.testing.assert_array_equal(counts, [[1, 10], [1, 20], [2, 30]])


def ref_boundary_counts(pred, labels, tol):
    ok = (labels >= 0) & (labels != IGN)
    gb = ref_boundary(labels)
    pb = ref_boundary(pred, ignore=None) & ok
    return np.array([(pb & ref_within(gb, tol)).sum(), pb.sum(), (gb & ref_within(pb, tol)).sum(), gb.sum()])


@pytest.mark.parametrize("tol", [0, 1, 2.2])
def test_boundary_counts_against_scipy(tol):
    rng = np.random.default_rng(5)
    labels = np.stack([random_labels(rng, (10, 12), 3) for _ in range(2)])
    pred = np.stack([random_labels(rng, (10, 12), 3, p_ignore=0) for _ in range(2)])
    refs = [ref_boundary_counts(pred[i], labels[i], tol) for i in range(2)]
    jitted = jax.jit(lambda p, l: M.boundary_counts(p, l, tolerance=tol))
    per_image = jax.vmap(jitted)(pred, labels)
    for i in range(2):
        np.testing.assert_array_equal(per_image[i], refs[i])
    total = sum(refs)
    np.testing.assert_array_equal(jitted(pred, labels), total)
    s = jax.jit(lambda p, l: M.boundary_fscore(p, l, tolerance=tol))(pred, labels)
    p, r = total[0] / total[1], total[2] / total[3]
    np.testing.assert_allclose(s["precision"], p)
    np.testing.assert_allclose(s["recall"], r)
    np.testing.assert_allclose(s["fscore"], 2 * p * r / (p + r) if p + r > 0 else 0.0)


def test_boundary_fscore_properties():
    labels = np.zeros((8, 8), np.int32)
    labels[:, 4:] = 1
    s = M.boundary_fscore(labels, labels, tolerance=0)
    assert float(s["fscore"]) == 1.0
    shifted = np.zeros_like(labels)
    shifted[:, 5:] = 1  # edge moved by one column
    assert float(M.boundary_fscore(shifted, labels, tolerance=0)["fscore"]) == pytest.approx(0.5)
    assert float(M.boundary_fscore(shifted, labels, tolerance=1)["fscore"]) == 1.0
    # a flat prediction has no boundary: precision undefined, recall 0
    s = M.boundary_fscore(np.zeros_like(labels), labels, tolerance=2)
    assert np.isnan(s["precision"]) and float(s["recall"]) == 0.0


# --------------------------------------------------------------------------- bad input


def test_bad_input_messages():
    lab = np.zeros((4, 5), np.int32)
    with pytest.raises(ValueError, match=r"pred: expected the shape of labels \(4, 5\), got \(4, 4\)"):
        M.confusion_matrix(np.zeros((4, 4), np.int32), lab, 3)
    with pytest.raises(TypeError, match="pred: expected an integer label array, got dtype float"):
        M.confusion_matrix(np.zeros((4, 5)), lab, 3)
    with pytest.raises(TypeError, match="labels: expected an integer"):
        M.trimap_counts(lab, lab.astype(np.float32), widths=(1,))
    with pytest.raises(ValueError, match="num_classes: expected an int > 0, got 0"):
        M.confusion_matrix(lab, lab, 0)
    with pytest.raises(ValueError, match=r"cm: expected shape \(N, N\) square = \(3, 3\), got \(3, 4\)"):
        M.summarize(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"widths: expected a finite number >= 0 \(pixels\), got -1"):
        M.trimap_counts(lab, lab, widths=(1, -1))
    with pytest.raises(ValueError, match="widths: expected at least one"):
        M.trimap_counts(lab, lab, widths=())
    with pytest.raises(TypeError, match="tolerance: expected a static non-negative number"):
        M.boundary_counts(lab, lab, tolerance="2")
    with pytest.raises(ValueError, match=r"labels: expected shape \(\.\.\., H, W\) with rank >= 2, got \(5,\)"):
        M.boundary_counts(lab[0], lab[0], tolerance=1)
    with pytest.raises(ValueError, match=r"mask: expected a rank-2 array \(H, W\), got shape \(4, 5, 1\)"):
        M.within_distance(lab[..., None] > 0, radius=1)
    with pytest.raises(ValueError, match=r"counts: expected shape \(4,\)"):
        M.summarize_boundary(np.zeros(3))
