"""Helpers for the notebooks in this folder (``import viz``; the kernel runs here): an example photo, coarse scores, operator rows, plots.

Nothing here is part of a method; it is the small amount of glue the two notebooks share
(``notebooks/operators.ipynb``, ``notebooks/gradients.ipynb``), kept in one place so that
the notebooks contain only the demonstration itself.

- :func:`notebook_size` / :func:`stanford_dir` / :func:`load_example` — the picture to work
  on: a Stanford Background photo (resized so its short side is ``size`` px) or, when the
  folder is absent, an image of the built-in synthetic dataset.
- :func:`coarse_scores` — class probabilities of a blocky "coarse network": the label map
  averaged over ``factor x factor`` blocks and bilinearly upsampled.
- :func:`linear_rows` — rows of a linear operator (e.g. SPN's propagation matrix ``G``, RWN's
  ``A``) as an image, by one vector-Jacobian product: no dense matrix.
- :func:`color_labels`, :func:`show_panels`, :func:`show_rows`, :func:`mean_iou` — plotting
  and a one-line score.

Plot functions return the matplotlib ``Figure``; they never call ``plt.show()``, so they run
under any backend (the tests and the documentation build execute the notebooks with the
inline backend, which keeps the figures as PNG outputs).
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rwseg import _validate as V
from rwseg import metrics
from rwseg.constants import IGNORE_INDEX
from rwseg.train.panels import PALETTE

__all__ = [
    "SIZE_ENV",
    "STANFORD_ENV",
    "notebook_size",
    "stanford_dir",
    "load_example",
    "coarse_scores",
    "linear_rows",
    "boundary_pixels",
    "mean_iou",
    "color_labels",
    "show_panels",
    "show_rows",
]

SIZE_ENV = "RWSEG_NOTEBOOK_SIZE"
STANFORD_ENV = "RWSEG_STANFORD_DIR"

_PALETTE = PALETTE / 255.0


# --------------------------------------------------------------------------- the example image


def notebook_size(default: int = 160) -> int:
    """The short side, in pixels, of the notebooks' image.

    The test suite sets ``RWSEG_NOTEBOOK_SIZE`` small (48) so that the notebooks run in seconds.

    Args:
        default: the size when ``$RWSEG_NOTEBOOK_SIZE`` is unset or empty.

    Returns:
        ``int($RWSEG_NOTEBOOK_SIZE)``, or ``default``.

    Raises:
        ValueError: ``$RWSEG_NOTEBOOK_SIZE`` is not an integer, or is below 16.
    """
    raw = os.environ.get(SIZE_ENV)
    if raw is None or raw == "":
        return default
    try:
        size = int(raw)
    except ValueError:
        raise ValueError(f"{SIZE_ENV}: expected an int number of pixels, got {raw!r}") from None
    if size < 16:
        raise ValueError(f"{SIZE_ENV}: expected at least 16 pixels, got {size}")
    return size


def stanford_dir(start=".") -> Optional[pathlib.Path]:
    """The Stanford Background folder, or ``None`` when it is absent.

    A folder counts only if it has ``images/`` and ``labels/``.

    Args:
        start: the notebook's folder (``notebooks/`` of the repository); without
            ``$RWSEG_STANFORD_DIR`` the folder looked at is ``shared/data/stanford_background``
            beside the repository (two levels above ``start``), the development layout.

    Returns:
        ``$RWSEG_STANFORD_DIR`` if set, else the default folder, as a ``pathlib.Path``;
        ``None`` when that folder lacks ``images/`` or ``labels/``.
    """
    env = os.environ.get(STANFORD_ENV)
    path = pathlib.Path(env) if env else pathlib.Path(start).resolve().parents[1] / "shared" / "data" / "stanford_background"
    return path if (path / "images").is_dir() and (path / "labels").is_dir() else None


def _resize(array: np.ndarray, size_hw: tuple[int, int], nearest: bool) -> np.ndarray:
    from PIL import Image

    h, w = size_hw
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(array).resize((w, h), resample=resample))


def load_example(size: int, *, root=None, example_id: str = "0000047", synthetic_index: int = 0) -> dict:
    """One photo with its labels, resized so that the short side is ``size`` pixels.

    Args:
        size: the short side in pixels (positive).
        root: the Stanford Background folder (see :func:`stanford_dir`), or ``None`` for the
            synthetic fallback: ``rwseg.data.synthetic_example(0, "train", synthetic_index)``
            at ``size x 4/3 size``.
        example_id: the Stanford Background photo.
        synthetic_index: the synthetic example used without ``root``.

    Returns:
        A dict: ``"image"``: float32 ``(H, W, 3)`` in ``[0, 1]``; ``"labels"``: int32
        ``(H, W)``, 255 = unknown (Stanford's ``-1``); ``"class_names"``: tuple of ``L``
        names; ``"num_classes"``: ``L``; ``"source"``: a sentence saying where the picture
        came from (print it).
    """
    size = V.check_nonnegative_int("size", size, positive=True)
    if root is not None:
        from rwseg.data import stanford

        ex = stanford.read_example(root, example_id)
        h0, w0 = ex["label"].shape
        scale = size / min(h0, w0)
        hw = (max(1, round(h0 * scale)), max(1, round(w0 * scale)))
        image = _resize(ex["image"], hw, nearest=False)
        labels = _resize(ex["label"], hw, nearest=True).astype(np.int32)
        names = stanford.CLASS_NAMES
        source = f"Stanford Background photo {example_id} from {root}, resized {h0}x{w0} -> {hw[0]}x{hw[1]}"
    else:
        from rwseg.data import synthetic

        hw = (size, round(size * 4 / 3))
        ex = synthetic.synthetic_example(0, "train", synthetic_index, hw)
        image, labels = ex["image"], ex["label"].astype(np.int32)
        names = synthetic.CLASS_NAMES
        source = (f"Stanford Background not found (looked at ${STANFORD_ENV}, else "
                  f"../../shared/data/stanford_background from the notebook folder); using synthetic image "
                  f"{synthetic_index} of the built-in dataset, {hw[0]}x{hw[1]}")
    return {
        "image": (image.astype(np.float32) / 255.0),
        "labels": labels,
        "class_names": tuple(names),
        "num_classes": len(names),
        "source": source,
    }


def coarse_scores(labels, num_classes: int, factor: int = 8, *, smoothing: float = 0.05, dtype=np.float32):
    """Class probabilities of a blocky "coarse network" made from a label map.

    The one-hot labels are averaged over ``factor x factor`` blocks (unknown pixels count
    for nothing), mixed with ``smoothing`` of the uniform distribution, bilinearly
    upsampled back to ``(H, W)`` and renormalised: right in the interior of large regions,
    wrong near boundaries and on thin structures, as a network at ``1/factor`` resolution.

    Args:
        labels: int ``(H, W)``; 255 or negative = unknown.
        num_classes: ``L``.
        factor: the block size.
        smoothing: the weight of the uniform distribution, in ``[0, 1]``.
        dtype: the output dtype.

    Returns:
        ``(H, W, L)`` probabilities (summing to 1 over the last axis) in ``dtype``.
    """
    labels = np.asarray(labels)
    h, w = labels.shape
    onehot = (labels[..., None] == np.arange(num_classes)).astype(np.float64)
    hb, wb = -(-h // factor), -(-w // factor)
    padded = np.zeros((hb * factor, wb * factor, num_classes))
    padded[:h, :w] = onehot
    blocks = padded.reshape(hb, factor, wb, factor, num_classes).sum(axis=(1, 3))
    total = blocks.sum(-1, keepdims=True)
    blocks = np.where(total > 0, blocks / np.maximum(total, 1), 1.0 / num_classes)
    blocks = (1 - smoothing) * blocks + smoothing / num_classes
    up = np.asarray(jax.image.resize(jnp.asarray(blocks), (h, w, num_classes), "linear"))
    up = np.maximum(up, 1e-6)
    return (up / up.sum(-1, keepdims=True)).astype(dtype)


def linear_rows(fn: Callable, x, pixels: Sequence[tuple[int, int]], *params, channel: int | None = 0) -> np.ndarray:
    """Rows of the linear map ``x -> fn(x, *params)`` as images, by vector-Jacobian products.

    ``out[n] = d fn(x)[pixels[n], c] / d x[:, :, c]``: the weights with which output pixel
    ``pixels[n]`` combines the input pixels (a row of SPN's ``G``, of RWN's ``A`` or of
    ``(I - alpha A)^-1``, ...). One compiled, vmapped backward pass; a dense
    ``(H·W, H·W)`` matrix is never formed.

    Args:
        fn: ``fn(x, *params)``, linear in ``x``, ``(H, W, C) -> (H, W, C)``, whose output
            channel ``c`` depends only on input channel ``c`` (every rwseg operator on a
            fixed affinity is such a map).
        x: an array ``(H, W, C)``; only its shape and dtype are used.
        pixels: ``(row, col)`` pairs, the output pixels whose rows are wanted.
        *params: the arrays ``fn`` depends on, passed as arguments of the compiled
            function (arrays closed over by ``fn`` would be baked into it as constants).
        channel: the channel ``c`` whose rows are wanted, or ``None`` for every channel
            (one operator per channel, e.g. the four SPN directions stacked as channels).

    Returns:
        numpy ``(len(pixels), H, W)`` with ``channel=c``; ``(len(pixels), H, W, C)`` with
        ``channel=None``; in ``x``'s dtype.
    """
    h, w, c = np.shape(x)
    dtype = jnp.result_type(x)
    chans = range(c) if channel is None else [channel]
    cots = np.zeros((len(pixels), len(chans), h, w, c), dtype)
    for n, (py, px) in enumerate(pixels):
        for j, ch in enumerate(chans):
            cots[n, j, py, px, ch] = 1

    @jax.jit
    def rows(cots, params):
        _, pullback = jax.vjp(lambda z: fn(z, *params), jnp.zeros((h, w, c), dtype))
        flat = jax.vmap(lambda cot: pullback(cot)[0])(cots.reshape((-1, h, w, c)))
        flat = flat.reshape((len(pixels), len(chans), h, w, c))
        picked = flat[:, jnp.arange(len(chans)), :, :, jnp.asarray(list(chans))]  # (len(chans), n, H, W)
        return jnp.moveaxis(picked, 0, -1)  # (n, H, W, len(chans))

    out = np.asarray(rows(jnp.asarray(cots), params))
    return out if channel is None else out[..., 0]


def boundary_pixels(labels, fractions: Sequence[tuple[float, float]]) -> list[tuple[int, int]]:
    """Ground-truth boundary pixels (``rwseg.metrics.boundary_mask``) nearest to given places.

    Used to pick pixels whose operator rows are interesting (they straddle an edge).

    Args:
        labels: int ``(H, W)``; 255 = unknown.
        fractions: ``(fy, fx)`` pairs in ``[0, 1]``, relative positions.

    Returns:
        One ``(row, col)`` per pair: the boundary pixel closest to
        ``(fy·(H-1), fx·(W-1))``, or that position itself when the map has no boundary.
    """
    labels = np.asarray(labels)
    h, w = labels.shape
    ys, xs = np.nonzero(np.asarray(metrics.boundary_mask(jnp.asarray(labels), ignore_index=IGNORE_INDEX)))
    out = []
    for fy, fx in fractions:
        ty, tx = fy * (h - 1), fx * (w - 1)
        if len(ys) == 0:
            out.append((int(round(ty)), int(round(tx))))
            continue
        i = int(np.argmin((ys - ty) ** 2 + (xs - tx) ** 2))
        out.append((int(ys[i]), int(xs[i])))
    return out


def mean_iou(scores, labels, num_classes: int) -> float:
    """Mean IoU (``rwseg.metrics``) of a score map's arg-max.

    Args:
        scores: ``(H, W, L)`` class scores or probabilities.
        labels: int ``(H, W)``; 255 = ignored.
        num_classes: ``L``.

    Returns:
        The mean IoU of ``argmax(scores, -1)`` against ``labels``, a float in ``[0, 1]``.
    """
    pred = jnp.argmax(jnp.asarray(scores), axis=-1).astype(jnp.int32)
    cm = metrics.confusion_matrix(pred, jnp.asarray(labels), num_classes, ignore_index=IGNORE_INDEX)
    return float(metrics.summarize(cm)["mean_iou"])


# --------------------------------------------------------------------------- plotting


def color_labels(labels, num_classes: int | None = None) -> np.ndarray:
    """Colours a label map.

    Args:
        labels: int ``(H, W)``; 255 or negative = ignored.
        num_classes: unused (the palette has 20 colours, repeated beyond).

    Returns:
        float ``(H, W, 3)`` RGB in ``[0, 1]``; ignored pixels are black.
    """
    labels = np.asarray(labels)
    known = (labels >= 0) & (labels != IGNORE_INDEX)
    rgb = _PALETTE[np.where(known, labels, 0) % len(_PALETTE)]
    return np.where(known[..., None], rgb, 0.0)


def _imshow(ax, panel, title, cmap=None, symmetric=False, colorbar=False):
    panel = np.asarray(panel)
    kwargs = {}
    if panel.ndim == 2:
        kwargs["cmap"] = cmap or ("RdBu_r" if symmetric else "viridis")
        # Robust colour range: gradients often have a few spikes (e.g. at seeds) that would
        # wash out everything else.
        if symmetric:
            v = float(np.percentile(np.abs(panel), 99)) or float(np.max(np.abs(panel))) or 1.0
            kwargs.update(vmin=-v, vmax=v)
        else:
            lo, hi = (float(q) for q in np.percentile(panel, [1, 99]))
            if hi > lo:
                kwargs.update(vmin=lo, vmax=hi)
    im = ax.imshow(panel, interpolation="nearest", **kwargs)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if colorbar and panel.ndim == 2:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    return im


def show_panels(panels: Sequence, titles: Sequence[str], *, ncols: int | None = None, cmap=None,
                symmetric: Sequence[bool] | bool = False, colorbar: bool = False, width: float = 3.2):
    """A grid of images: RGB ``(H, W, 3)`` or scalar ``(H, W)`` maps, one title each.

    Scalar maps are shown with a robust range: the 1st to 99th percentile, or +-the 99th
    percentile of ``|value|`` when symmetric (a few spikes would wash out the rest).

    Args:
        panels: the images, all of the first one's ``(H, W)`` aspect.
        titles: one title per panel.
        ncols: panels per row (default: all in one row).
        cmap: the colour map of scalar panels (default ``viridis``, ``RdBu_r`` when symmetric).
        symmetric: per panel (or one flag for all): a diverging colour map centred at 0
            (for gradients).
        colorbar: add a colour bar to scalar panels.
        width: the width of one panel, in inches.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ValueError: not one title per panel.
    """
    import matplotlib.pyplot as plt

    n = len(panels)
    if len(titles) != n:
        raise ValueError(f"titles: expected {n} titles (one per panel), got {len(titles)}")
    ncols = ncols or n
    nrows = -(-n // ncols)
    sym = [symmetric] * n if isinstance(symmetric, bool) else list(symmetric)
    h, w = np.shape(panels[0])[:2]
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, width * nrows * h / w + 0.4), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, panel, title, s in zip(axes.flat, panels, titles, sym):
        _imshow(ax, panel, title, cmap=cmap, symmetric=s, colorbar=colorbar)
    fig.tight_layout()
    return fig


def show_rows(image, rows: Sequence, pixels: Sequence[tuple[int, int]], titles: Sequence[str], *,
              ncols: int | None = None, log: bool = False, zoom: int | None = None, floor: float = 1e-4,
              width: float = 3.2):
    """Operator rows (e.g. from :func:`linear_rows`) as heat maps over the image in grey.

    Each panel shows ``|row|`` (or ``log10 |row|``) over the grey image, with the row's
    pixel marked by a cross.

    Args:
        image: ``(H, W, 3)``, shown in grey.
        rows: one ``(H, W)`` row per panel.
        pixels: the ``(row, col)`` of each row's pixel.
        titles: one title per row.
        ncols: panels per row of the grid (default: all in one row).
        log: show ``log10 |row|``; entries below ``floor`` times the row's maximum are
            left transparent.
        zoom: ``r`` crops every panel to the ``(2r + 1)`` square around its pixel (for
            short-range rows such as a stencil's); ``None`` shows the whole image.
        floor: the relative floor of the log scale.
        width: the width of one panel, in inches.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ValueError: not one pixel and one title per row.
    """
    import matplotlib.pyplot as plt

    n = len(rows)
    if not (len(pixels) == len(titles) == n):
        raise ValueError(f"pixels, titles: expected {n} of each (one per row), got {len(pixels)} and {len(titles)}")
    grey = np.asarray(image).mean(axis=-1)
    ncols = ncols or n
    nrows = -(-n // ncols)
    h, w = grey.shape
    aspect = 1.0 if zoom is not None else h / w
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, width * nrows * aspect + 0.4), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, row, (py, px), title in zip(axes.flat, rows, pixels, titles):
        mag = np.abs(np.asarray(row, np.float64))
        peak = mag.max()
        hidden = mag <= (peak * floor if log else 0)
        if log:
            mag = np.log10(np.maximum(mag, peak * floor if peak > 0 else 1e-30))
        ax.imshow(grey, cmap="gray", interpolation="nearest")
        ax.imshow(np.ma.masked_where(hidden, mag), cmap="inferno", alpha=0.75, interpolation="nearest")
        ax.plot([px], [py], marker="+", color="cyan", markersize=10, mew=2)
        if zoom is not None:
            ax.set_xlim(max(px - zoom, 0) - 0.5, min(px + zoom, w - 1) + 0.5)
            ax.set_ylim(min(py + zoom, h - 1) + 0.5, max(py - zoom, 0) - 0.5)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig
