"""Segmentation metrics used by the papers (``docs/methods.md``, "Metrics").

Region metrics
    :func:`confusion_matrix` (summable over images, batches and devices) and
    :func:`summarize` (mean IoU, frequency-weighted IoU, pixel / mean class accuracy).
Boundary metrics
    :func:`trimap_counts` / :func:`trimap_error` (pixel error in a band around the
    ground-truth boundaries, Bertasius et al., *Convolutional Random Walk Networks for
    Semantic Image Segmentation*, Fig. 5) and :func:`boundary_counts` /
    :func:`boundary_fscore` (boundaries of the prediction against the ground-truth
    boundaries with a distance tolerance, ibid. Table 4). The ``*_counts`` functions
    return integer counts that add up over a dataset; :func:`summarize_trimap` and
    :func:`summarize_boundary` turn the summed counts into rates.

Definitions shared by the boundary metrics
    *Ignored pixel*: a ground-truth label that is negative or equal to ``ignore_index``.
    *Boundary pixel* (:func:`boundary_mask`): a pixel that is not ignored and has a
    4-connected neighbour inside the image that is not ignored and carries a different
    label. Both sides of a label edge are boundary pixels (boundaries are two pixels
    thick); the image border is not a boundary. With ``void_boundaries=True`` an ignored
    neighbour also counts as "a different label" (useful for PASCAL VOC, whose void band
    covers the object outlines).
    *Distance*: Euclidean distance between pixel centres; the band of width ``w`` is
    the set of pixels at distance ``<= w`` from the nearest ground-truth boundary pixel
    (so width 0 is the boundary itself). :func:`within_distance` computes it exactly
    (a binary dilation with a Euclidean disk of radius ``w``) in O(H·W·w) with jnp.

Everything here is jit-able (sizes, widths and tolerances are static Python values) and
works on integer label maps of any leading batch shape ``(..., H, W)``.

Values that cannot be checked under ``jit`` (predictions, and labels that are not
ignored, outside ``[0, num_classes)``) are checked eagerly when the arrays are concrete;
pass ``checked=True`` and wrap the call in ``jax.experimental.checkify.checkify`` to
check them under ``jit``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rwseg import _validate as V
from rwseg import stencil as S
from rwseg._numerics import masked_mean, safe_divide
from rwseg.constants import IGNORE_INDEX

__all__ = [
    "confusion_matrix",
    "summarize",
    "boundary_mask",
    "within_distance",
    "trimap_counts",
    "trimap_error",
    "summarize_trimap",
    "boundary_counts",
    "boundary_fscore",
    "summarize_boundary",
]


def _int_dtype():
    """The default integer dtype (int64 with ``jax_enable_x64``, else int32)."""
    return jnp.asarray(0).dtype


def _float_dtype():
    """The default float dtype (float64 with ``jax_enable_x64``, else float32)."""
    return jnp.asarray(0.0).dtype


def _check_pair(pred, labels):
    V.check_integer("pred", pred)
    V.check_integer("labels", labels)
    if np.shape(pred) != np.shape(labels):
        raise ValueError(
            f"pred: expected the shape of labels {tuple(np.shape(labels))}, got {tuple(np.shape(pred))}"
        )


def _label_valid(labels, ignore_index):
    ok = labels >= 0
    if ignore_index is not None:
        ok = ok & (labels != ignore_index)
    return ok


# --------------------------------------------------------------------------- region metrics


def confusion_matrix(pred, labels, num_classes: int, *, ignore_index: int | None = IGNORE_INDEX,
                     checked: bool = False, return_out_of_range: bool = False):
    """Confusion matrix ``cm[t, p]`` = number of pixels of true class ``t`` predicted as ``p``.

    Pixels whose label is ignored (negative or equal to ``ignore_index``) are skipped.
    Every other label must lie in ``[0, num_classes)`` and every prediction in
    ``[0, num_classes)``: both are checked eagerly on concrete inputs (``ValueError``
    naming ``labels`` or ``pred``). Under ``jit`` a pixel with an out-of-range label or
    prediction cannot raise and is left out of ``cm``; ``return_out_of_range=True`` counts
    those pixels (pass the count to :func:`summarize`, which then reports it and gives NaN
    scores), and ``checked=True`` inside ``checkify.checkify`` reports them as an error.
    Matrices and counts add up over images, batches and devices (``psum``).

    Args:
        pred: int array ``(..., H, W)`` (any shape: pixels are simply counted).
        labels: int array of the same shape as ``pred``.
        num_classes: number of classes N.
        ignore_index: ground-truth label value to ignore (negative labels are always
            ignored); ``None`` ignores only negative labels.
        checked: add ``checkify`` value checks for traced inputs.
        return_out_of_range: also return the counts of the pixels left out of ``cm``
            because a value is out of range.

    Returns:
        ``(N, N)`` integer counts (default int dtype: int64 with ``jax_enable_x64``, else
            int32 — sum on the host in int64 for very large datasets). Rows are ground truth,
            columns prediction. With ``return_out_of_range=True`` the pair ``(cm, oor)``:
            ``oor`` (2,) integer counts, ``oor[0]`` the pixels whose label is not ignored and
            outside ``[0, N)``, ``oor[1]`` the pixels whose label is not ignored and whose
            prediction is outside ``[0, N)`` (a pixel with both counts in both; an ignored
            pixel counts in neither, whatever its prediction).
    """
    num_classes = V.check_nonnegative_int("num_classes", num_classes, positive=True)
    _check_pair(pred, labels)
    pred = jnp.asarray(pred).reshape(-1)
    labels = jnp.asarray(labels).reshape(-1)
    pred_ok = (pred >= 0) & (pred < num_classes)
    ignored = ~_label_valid(labels, ignore_index)
    label_ok = ignored | (labels < num_classes)
    pred_msg = f"pred: expected class indices in [0, {num_classes}), got "
    ignore_text = "negative" if ignore_index is None else f"negative or ignore_index = {ignore_index}"
    label_msg = f"labels: expected class indices in [0, {num_classes}) or ignored labels ({ignore_text}), got "
    for x, ok, msg in ((pred, pred_ok, pred_msg), (labels, label_ok, label_msg)):
        if V.is_concrete(x) and not bool(jnp.all(ok)):
            bad = np.unique(np.asarray(x)[~np.asarray(ok)])
            raise ValueError(msg + f"out-of-range values {bad[:10].tolist()}")
    if checked:
        V.value_check(jnp.all(pred_ok), pred_msg + "values from {} to {}", jnp.min(pred), jnp.max(pred))
        V.value_check(jnp.all(label_ok), label_msg + "a largest non-ignored label of {}",
                      jnp.max(jnp.where(ignored, -1, labels)))
    valid = ~ignored & label_ok & pred_ok
    index = jnp.where(valid, labels * num_classes + pred, 0)
    dtype = _int_dtype()
    counts = jnp.zeros(num_classes * num_classes, dtype).at[index].add(valid.astype(dtype))
    cm = counts.reshape(num_classes, num_classes)
    if not return_out_of_range:
        return cm
    oor = jnp.stack([jnp.sum(~ignored & ~label_ok, dtype=dtype), jnp.sum(~ignored & ~pred_ok, dtype=dtype)])
    return cm, oor


def summarize(cm, *, out_of_range=None) -> dict:
    """Region scores from a (summed) confusion matrix (rows = ground truth).

    - ``per_class_iou`` (N,): ``tp / (gt + pred - tp)``; NaN for classes absent from
      both ground truth and prediction;
    - ``mean_iou``: mean of ``per_class_iou`` over the classes present in ground truth
      or prediction (a class predicted but never true has IoU 0 and counts);
    - ``fw_iou``: frequency-weighted IoU, ``sum_c gt_c * iou_c / sum_c gt_c``;
    - ``pixel_accuracy``: ``sum tp / sum cm``;
    - ``per_class_accuracy`` (N,): ``tp / gt`` (NaN where the class is absent from the
      ground truth) and ``mean_accuracy``: its mean over classes present in ground truth.

    A quantity with nothing to average over (empty matrix) is NaN. jit-able.

    With ``out_of_range`` (the summed second result of ``confusion_matrix(...,
    return_out_of_range=True)``) the dict also holds ``out_of_range_labels`` and
    ``out_of_range_pred`` (integer pixel counts), and every score above is NaN when either
    is nonzero: pixels left out of ``cm`` make its scores those of another dataset.

    Args:
        cm: ``(N, N)`` counts from :func:`confusion_matrix`.
        out_of_range: optional ``(2,)`` integer counts (out-of-range labels, predictions)
            from :func:`confusion_matrix`.

    Returns:
        A dict of default-float jnp values with the keys above.
    """
    V.check_rank("cm", cm, 2, "(N, N)")
    n = np.shape(cm)[0]
    V.check_shape("cm", cm, (n, n), "(N, N) square")
    cm = jnp.asarray(cm).astype(_float_dtype())
    tp = jnp.diagonal(cm)
    gt = cm.sum(axis=1)
    pr = cm.sum(axis=0)
    union = gt + pr - tp
    present = union > 0
    in_gt = gt > 0
    nan = jnp.nan
    iou = safe_divide(tp, union, nan)
    acc = safe_divide(tp, gt, nan)
    total = cm.sum()
    scores = {
        "mean_iou": masked_mean(iou, present, empty=nan),
        "fw_iou": safe_divide(jnp.where(in_gt, gt * iou, 0).sum(), total, nan),
        "pixel_accuracy": safe_divide(tp.sum(), total, nan),
        "mean_accuracy": masked_mean(acc, in_gt, empty=nan),
        "per_class_iou": iou,
        "per_class_accuracy": acc,
    }
    if out_of_range is None:
        return scores
    V.check_shape("out_of_range", out_of_range, (2,), "(2,) counts of out-of-range labels and predictions")
    V.check_integer("out_of_range", out_of_range)
    out_of_range = jnp.asarray(out_of_range)
    clean = jnp.all(out_of_range == 0)
    scores = {k: jnp.where(clean, v, nan) for k, v in scores.items()}
    scores["out_of_range_labels"] = out_of_range[0]
    scores["out_of_range_pred"] = out_of_range[1]
    return scores


# --------------------------------------------------------------------------- boundaries and distances


def _boundary(labels, valid, void_boundaries: bool):
    """(H, W) labels + (H, W) validity -> (H, W) bool boundary pixels (see module docstring)."""
    h, w = labels.shape
    offsets = S.four_connected()
    nbr = S.gather(labels[:, :, None], offsets)[..., 0]
    nbr_valid = S.gather(valid[:, :, None], offsets)[..., 0]
    inside = S.valid_mask(h, w, offsets)
    differs = nbr_valid & (nbr != labels[:, :, None])
    if void_boundaries:
        differs = differs | ~nbr_valid
    return valid & jnp.any(inside & differs, axis=-1)


def boundary_mask(labels, *, ignore_index: int | None = IGNORE_INDEX, void_boundaries: bool = False):
    """Ground-truth boundary pixels of a label map.

    A pixel is a boundary pixel when it is not ignored (label ``>= 0`` and
    ``!= ignore_index``) and one of its 4-connected neighbours inside the image is not
    ignored and has a different label. The image border is not a boundary. Used for
    Bertasius et al.'s trimap error (Fig. 5) and boundary F-score (Table 4).

    Args:
        labels: (H, W) int label map.
        ignore_index: label value to ignore (negative labels are always
            ignored); ``None`` ignores only negative labels. Use ``None`` for a prediction.
        void_boundaries: a non-ignored pixel next to an ignored one is a boundary pixel too.

    Returns:
        (H, W) bool.
    """
    V.check_rank("labels", labels, 2, "(H, W)")
    V.check_integer("labels", labels)
    labels = jnp.asarray(labels)
    return _boundary(labels, _label_valid(labels, ignore_index), void_boundaries)


def _check_radius(name, radius) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a static non-negative number (pixels), got {type(radius).__name__} {radius!r}")
    if not radius >= 0 or not math.isfinite(radius):
        raise ValueError(f"{name}: expected a finite number >= 0 (pixels), got {radius!r}")
    return float(radius)


def _squared_distance(mask, radius: float):
    """(H, W) bool -> (H, W) int: exact squared Euclidean distance to the nearest True
    pixel where it is ``<= radius**2``; some value ``> radius**2`` elsewhere.

    Two passes: the vertical distance ``g`` to the nearest True pixel of the same column
    (running max / min of row indices), then ``d2(y, x) = min_{|dx| <= R} g(y, x+dx)^2 + dx^2``.
    A point within distance R has ``|dx| <= R``, so the search window is exact there.
    """
    h, w = mask.shape
    r = int(math.floor(radius))
    cap = r + 1  # vertical distances beyond R are capped: they can only give d2 > R^2
    rows = jnp.arange(h, dtype=jnp.int32)[:, None]
    far = jnp.int32(h + cap + 1)
    above = jax.lax.cummax(jnp.where(mask, rows, -far), axis=0)
    below = jax.lax.cummin(jnp.where(mask, rows, h + far), axis=0, reverse=True)
    g = jnp.minimum(jnp.minimum(rows - above, below - rows), cap)
    # Maximise a closeness ``big - g^2 - dx^2`` instead of minimising d2, so that the
    # zeros that S.shift puts outside the image (closeness <= 0) never win.
    big = jnp.int32(cap * cap + r * r + 1)
    close = big - g * g
    best = close
    for dx in range(1, min(r, w - 1) + 1):
        for sx in (-dx, dx):
            best = jnp.maximum(best, S.shift(close, (0, sx)) - dx * dx)
    return big - best


def within_distance(mask, *, radius):
    """Pixels within Euclidean distance ``radius`` of a True pixel of ``mask``.

    Equals ``scipy.ndimage.distance_transform_edt(~mask) <= radius`` (a binary dilation by
    a disk). O(H·W·radius) time, O(H·W) memory; jit-able.

    Args:
        mask: (H, W) bool.
        radius: static number >= 0 (pixels).

    Returns:
        (H, W) bool.
    """
    V.check_rank("mask", mask, 2, "(H, W)")
    radius = _check_radius("radius", radius)
    mask = jnp.asarray(mask).astype(bool)
    return _squared_distance(mask, radius) <= radius * radius


def _batched(fn, pred, labels):
    """Apply per-image ``fn(pred, labels)`` over leading dims of ``(..., H, W)`` and sum."""
    if np.ndim(labels) < 2:
        raise ValueError(f"labels: expected shape (..., H, W) with rank >= 2, got {tuple(np.shape(labels))}")
    h, w = np.shape(labels)[-2:]
    pred = jnp.asarray(pred).reshape(-1, h, w)
    labels = jnp.asarray(labels).reshape(-1, h, w)
    return jax.vmap(fn)(pred, labels).sum(axis=0)


def _check_widths(widths) -> tuple[float, ...]:
    if isinstance(widths, (int, float, np.integer, np.floating)):
        widths = (widths,)
    widths = tuple(_check_radius("widths", w) for w in widths)
    if not widths:
        raise ValueError("widths: expected at least one band width, got an empty sequence")
    return widths


def trimap_counts(pred, labels, *, widths: Sequence[float], ignore_index: int | None = IGNORE_INDEX,
                  void_boundaries: bool = False):
    """Pixel errors inside bands around the ground-truth boundaries (Bertasius et al., Fig. 5).

    For width ``w`` the band is the set of non-ignored pixels at Euclidean distance
    ``<= w`` from a ground-truth boundary pixel (:func:`boundary_mask`); ``pixels`` counts
    them and ``errors`` those with ``pred != labels``. Ignored pixels are never counted
    (but do not block distances). Counts add up over a dataset; :func:`summarize_trimap`
    gives the error rates. jit-able.

    Args:
        pred: int ``(..., H, W)`` prediction.
        labels: int ``(..., H, W)`` ground truth.
        widths: static numbers ``>= 0`` (pixels), the band widths.
        ignore_index: ground-truth label value to ignore (negative labels are always
            ignored); ``None`` ignores only negative labels.
        void_boundaries: as for :func:`boundary_mask`.

    Returns:
        ``(len(widths), 2)`` integer counts ``[errors, pixels]`` per width, summed over the
            leading dims.
    """
    _check_pair(pred, labels)
    widths = _check_widths(widths)
    dtype = _int_dtype()

    def one(p, l):
        valid = _label_valid(l, ignore_index)
        d2 = _squared_distance(_boundary(l, valid, void_boundaries), max(widths))
        wrong = valid & (p != l)
        rows = []
        for w in widths:
            band = valid & (d2 <= w * w)
            rows.append(jnp.stack([(band & wrong).sum(dtype=dtype), band.sum(dtype=dtype)]))
        return jnp.stack(rows)

    return _batched(one, pred, labels)


def summarize_trimap(counts):
    """Error rates from summed trimap counts.

    Args:
        counts: ``(K, 2)`` summed ``[errors, pixels]`` from :func:`trimap_counts`.

    Returns:
        ``(K,)`` default-float error rates ``errors / pixels`` (NaN for an empty band).
    """
    V.check_rank("counts", counts, 2, "(K, 2)")
    V.check_shape("counts", counts, (None, 2), "(K, 2) [errors, pixels]")
    counts = jnp.asarray(counts).astype(_float_dtype())
    err, tot = counts[:, 0], counts[:, 1]
    return safe_divide(err, tot, jnp.nan)


def trimap_error(pred, labels, *, widths: Sequence[float], ignore_index: int | None = IGNORE_INDEX,
                 void_boundaries: bool = False):
    """Error rate inside the trimap band of each width (Bertasius et al., Fig. 5).

    The fraction of non-ignored pixels within distance ``w`` of a ground-truth boundary
    that are mislabelled, pooled over the leading dims. See :func:`trimap_counts` for the
    exact definition and for accumulating over a dataset.

    Args:
        pred: int ``(..., H, W)`` prediction.
        labels: int ``(..., H, W)`` ground truth.
        widths: static numbers ``>= 0`` (pixels), the band widths.
        ignore_index: ground-truth label value to ignore (negative labels are always
            ignored); ``None`` ignores only negative labels.
        void_boundaries: as for :func:`boundary_mask`.

    Returns:
        ``(len(widths),)`` default-float error rates.
    """
    return summarize_trimap(trimap_counts(pred, labels, widths=widths, ignore_index=ignore_index,
                                          void_boundaries=void_boundaries))


def boundary_counts(pred, labels, *, tolerance: float, ignore_index: int | None = IGNORE_INDEX,
                    void_boundaries: bool = False):
    """Boundary matching counts for the boundary F-score (Bertasius et al., Table 4).

    - gt boundary pixels: :func:`boundary_mask` of ``labels``;
    - pred boundary pixels: :func:`boundary_mask` of ``pred`` (every prediction is
      valid), restricted to pixels whose ground truth is not ignored;
    - a pred (gt) boundary pixel is matched when a gt (pred) boundary pixel lies within
      Euclidean distance ``tolerance``.

    This is the relaxed (many-to-one) matching, not the one-to-one assignment of the
    BSDS benchmark; hard segmentations have a single operating point, so the result is
    one F-score rather than the paper's max F-score / AP over thresholds. Counts add up
    over a dataset; :func:`summarize_boundary` gives precision, recall and F-score.

    Args:
        pred: int ``(..., H, W)`` prediction.
        labels: int ``(..., H, W)`` ground truth.
        tolerance: static number ``>= 0`` (pixels).
        ignore_index: ground-truth label value to ignore (negative labels are always
            ignored); ``None`` ignores only negative labels.
        void_boundaries: as for :func:`boundary_mask`.

    Returns:
        ``(4,)`` integer counts ``[matched_pred, pred_boundary, matched_gt, gt_boundary]``
            summed over the leading dims.
    """
    _check_pair(pred, labels)
    tolerance = _check_radius("tolerance", tolerance)
    dtype = _int_dtype()

    def one(p, l):
        valid = _label_valid(l, ignore_index)
        gt_b = _boundary(l, valid, void_boundaries)
        pr_b = _boundary(p, jnp.ones_like(valid), False) & valid
        t2 = tolerance * tolerance
        pr_hit = pr_b & (_squared_distance(gt_b, tolerance) <= t2)
        gt_hit = gt_b & (_squared_distance(pr_b, tolerance) <= t2)
        return jnp.stack([pr_hit.sum(dtype=dtype), pr_b.sum(dtype=dtype),
                          gt_hit.sum(dtype=dtype), gt_b.sum(dtype=dtype)])

    return _batched(one, pred, labels)


def summarize_boundary(counts) -> dict:
    """Precision, recall and F-score from summed boundary counts.

    An empty denominator gives NaN; ``fscore`` is 0 when P = R = 0.

    Args:
        counts: ``(4,)`` summed counts from :func:`boundary_counts`.

    Returns:
        A dict with ``precision`` (matched_pred / pred_boundary), ``recall``
            (matched_gt / gt_boundary) and ``fscore`` (``2PR / (P + R)``), default-float scalars.
    """
    V.check_shape("counts", counts, (4,), "(4,) [matched_pred, pred_boundary, matched_gt, gt_boundary]")
    c = jnp.asarray(counts).astype(_float_dtype())
    precision = safe_divide(c[0], c[1], jnp.nan)
    recall = safe_divide(c[2], c[3], jnp.nan)
    fscore = safe_divide(2 * precision * recall, precision + recall, 0)  # NaN stays NaN
    return {"precision": precision, "recall": recall, "fscore": fscore}


def boundary_fscore(pred, labels, *, tolerance: float, ignore_index: int | None = IGNORE_INDEX,
                    void_boundaries: bool = False) -> dict:
    """Boundary precision, recall and F-score of a segmentation (Bertasius et al., Table 4).

    Definitions in :func:`boundary_counts`.

    Args:
        pred: int ``(..., H, W)`` prediction.
        labels: int ``(..., H, W)`` ground truth.
        tolerance: static number ``>= 0`` (pixels).
        ignore_index: ground-truth label value to ignore (negative labels are always
            ignored); ``None`` ignores only negative labels.
        void_boundaries: as for :func:`boundary_mask`.

    Returns:
        A dict of scalars (``precision``, ``recall``, ``fscore``) pooled over the leading dims.
    """
    return summarize_boundary(boundary_counts(pred, labels, tolerance=tolerance, ignore_index=ignore_index,
                                              void_boundaries=void_boundaries))
