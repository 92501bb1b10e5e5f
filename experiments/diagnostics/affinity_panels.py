"""The learned affinities drawn next to a colour (bilateral) kernel on the same photo (issue 26,
item 3: do the learned refinements' pairwise couplings follow colour edges, label edges, or
nothing?).

    PYTHONPATH=. python experiments/diagnostics/affinity_panels.py RUN [RUN ...] --out PNG \
        [--images 4] [--split validation] [--sigma 0.05] [--densecrf-sxy 80 --densecrf-srgb 5] [--dpi 75]

For the first ``--images`` photos of ``--split`` (the dev split ``validation`` by default; the
test split is refused: this chooses what to try next) and each run (latest checkpoint), the
method's coupling ``c`` between a pixel and its nearest neighbours on the method's own stencil and
grid, through the layer's public methods:

- ``rwn``: :meth:`rwseg.layers.RandomWalkRefinement.affinities` (the test-time disk), offsets
  (0, 1) and (1, 0) on the walk grid (``1 / downsample``);
- ``gcrf``: :meth:`rwseg.layers.GaussianCRF.similarity`; its bipartite stencil has no
  horizontal or vertical offset, so its nearest ones, (1, 1) and (1, -1), on the GMF grid;
- ``spn``: :meth:`rwseg.layers.SpatialPropagation.guidance_gates`, the magnitude of the middle
  gate (the one to the previous column / row, not the diagonal ones), averaged over the class
  channels; the pair (i, i + o) averages the two directions that cross it (left-to-right at
  i + o and right-to-left at i for o = (0, 1));
- ``dilated``: :meth:`rwseg.layers.DilatedAffinity.affinity_logits` of the smallest rate r,
  offsets (0, r) and (r, 0), as the propagation's gate ``sigmoid(mu * logit)`` (eq. 7; ``mu`` the
  run's), averaged over the pair's two directions;
- a run with no refinement layer (``baseline``): ``c = 1`` where the control's predicted labels
  of the two pixels agree, else 0 (its prediction's edges, not an affinity).

Next to them, on the same photo: the colour kernel ``exp(-|rgb_i - rgb_j|^2 / (2 sigma^2))``
(rgb in [0, 1], the photo as the layer sees it, average-pooled to the method's grid) on the
same pairs, and DenseCRF's bilateral weight between neighbours,
``exp(-|p_i - p_j|^2 / (2 sxy^2) - |I_i - I_j|^2 / (2 srgb^2))`` (I in 0..255, p in image
pixels; the weight ``w1`` left out): at |p_i - p_j| = 1 and sxy = 80 it is the colour kernel with
sigma = srgb / 255 (the spatial factor is 0.99992), so a steeper one.

The figure: per photo a row with the photo, the ground truth, the colour kernel and DenseCRF's
weight on the full-resolution 4-neighbours, then per run its edge map and, where its grid or
stencil differs, the colour kernel on that grid and stencil. An edge map is ``1 - c``, the mean
over the pixel's pairs (i, i + o), normalised per map to its own 1st-99th percentile; each
panel's title gives the raw 5th-95th percentile of ``c`` (a flat map looks noisy after
normalisation: the range says how flat it is).

One JSON line per map, pooled over the photos' pairs (both pixels inside the photo, both labels
valid; labels on a grid cell: the block majority, :func:`rwseg.layers.grid.subsample_labels`):
``spearman_kernel`` / ``pearson_kernel`` (correlation of ``c`` with the colour kernel on the same
pairs: 1 for a map that orders pairs as colour does), ``label_auc`` (the probability that a pair
with different labels has a smaller ``c`` than a pair with the same label, ties half: 0.5 for a
map that ignores label edges, 1 for one that separates them), ``kernel_label_auc`` (the same for
the colour kernel on the same pairs), ``coupling_same`` / ``coupling_diff`` (mean ``c`` on
same-label / different-label pairs; ``kernel_same`` / ``kernel_diff`` the colour kernel's),
``diff_over_same`` (``coupling_diff / coupling_same``: how much of a region's coupling leaks across
a label edge; ``kernel_diff_over_same`` the colour kernel's), ``coupling_p5`` / ``coupling_p95``.
"""

import argparse
import json
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

SPLITS = ("train", "validation")  # never "test": the panels choose what to try next
FULL_RES_OFFSETS = ((0, 1), (1, 0))
REFERENCE = "colour kernel"


# ----------------------------------------------------------------------------- stencil helpers


def nearest_offsets(offsets) -> tuple:
    """The stencil's nearest offsets, one of each ``±o`` pair.

    Args:
        offsets: ``(dy, dx)`` pairs (a stencil).

    Returns:
        The offsets of smallest ``dy^2 + dx^2`` with ``dy > 0`` or ``dy == 0, dx > 0``, sorted,
        e.g. ``((0, 1), (1, 0))`` for a disk and ``((1, -1), (1, 1))`` for GCRF's bipartite one.
    """
    half = [tuple(int(v) for v in o) for o in offsets if o[0] > 0 or (o[0] == 0 and o[1] > 0)]
    if not half:
        raise ValueError(f"offsets: expected a stencil with a nonzero offset, got {tuple(offsets)!r}")
    d = min(dy * dy + dx * dx for dy, dx in half)
    return tuple(sorted(o for o in half if o[0] ** 2 + o[1] ** 2 == d))


def shifted(a: np.ndarray, offset) -> np.ndarray:
    """``out[i] = a[i + offset]``, NaN where ``i + offset`` is outside.

    Args:
        a: (H, W, ...) array.
        offset: ``(dy, dx)``.

    Returns:
        (H, W, ...) float64.
    """
    a = np.asarray(a, np.float64)
    out = np.full(a.shape, np.nan)
    dy, dx = int(offset[0]), int(offset[1])
    h, w = a.shape[:2]
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[yd, xd] = a[ys, xs]
    return out


def pair_couplings(weights: np.ndarray, offsets, chosen) -> np.ndarray:
    """The coupling of each pair ``(i, i + o)``, ``o`` in ``chosen``.

    Args:
        weights: (H, W, N) couplings on ``offsets`` (``weights[i, n]`` couples i and i + o_n).
        offsets: the N offsets.
        chosen: offsets among ``offsets`` (e.g. :func:`nearest_offsets`).

    Returns:
        (H, W, len(chosen)) float64: ``weights[i, o]``, averaged with ``weights[i + o, -o]``
        where ``-o`` is an offset too (the pair's other direction); NaN where ``i + o`` is outside.
    """
    offsets = [tuple(int(v) for v in o) for o in offsets]
    weights = np.asarray(weights, np.float64)
    out = []
    for o in chosen:
        o = tuple(int(v) for v in o)
        fwd = weights[..., offsets.index(o)]
        nbr_inside = ~np.isnan(shifted(np.zeros(fwd.shape), o))
        if (-o[0], -o[1]) in offsets:
            pair = 0.5 * (fwd + shifted(weights[..., offsets.index((-o[0], -o[1]))], o))
        else:
            pair = np.where(nbr_inside, fwd, np.nan)
        out.append(pair)
    return np.stack(out, axis=-1)


def pool(image: np.ndarray, factor: int) -> np.ndarray:
    """Block-average an (H, W, C) map by ``factor`` (H, W divisible by it) -> (H/f, W/f, C)."""
    if factor == 1:
        return np.asarray(image, np.float64)
    h, w, c = image.shape
    return np.asarray(image, np.float64).reshape(h // factor, factor, w // factor, factor, c).mean(axis=(1, 3))


def colour_kernel(image01: np.ndarray, chosen, sigma: float = 0.05) -> np.ndarray:
    """The colour kernel ``exp(-|rgb_i - rgb_j|^2 / (2 sigma^2))`` on the pairs ``(i, i + o)``.

    Args:
        image01: (H, W, 3) float RGB in [0, 1] (already on the method's grid).
        chosen: the offsets ``o``.
        sigma: the colour bandwidth (in [0, 1] units).

    Returns:
        (H, W, len(chosen)) float64, NaN where ``i + o`` is outside.
    """
    x = np.asarray(image01, np.float64)
    return np.stack([np.exp(-np.sum((x - shifted(x, o)) ** 2, axis=-1) / (2 * sigma ** 2)) for o in chosen], -1)


def densecrf_bilateral(image255: np.ndarray, chosen, *, sxy: float, srgb: float, pixel_step: int = 1) -> np.ndarray:
    """DenseCRF's bilateral (appearance) kernel between the pairs ``(i, i + o)``, weight ``w1`` left out.

    Args:
        image255: (H, W, 3) float RGB in 0..255 (on the grid of the offsets).
        chosen: the offsets ``o`` (grid cells).
        sxy: the spatial bandwidth theta_a in image pixels.
        srgb: the colour bandwidth theta_b in 0..255 units.
        pixel_step: image pixels per grid cell (the offsets' length in pixels is ``|o| * pixel_step``).

    Returns:
        (H, W, len(chosen)) float64, NaN where ``i + o`` is outside.
    """
    x = np.asarray(image255, np.float64)
    return np.stack([np.exp(-(pixel_step ** 2) * (o[0] ** 2 + o[1] ** 2) / (2 * sxy ** 2)
                            - np.sum((x - shifted(x, o)) ** 2, axis=-1) / (2 * srgb ** 2)) for o in chosen], -1)


def label_pairs(labels: np.ndarray, chosen, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Which pairs ``(i, i + o)`` have different labels.

    Args:
        labels: (H, W) int labels on the grid (ignored: outside ``0..num_classes - 1``).
        chosen: the offsets ``o``.
        num_classes: K.

    Returns:
        ``(different, valid)``, both (H, W, len(chosen)) bool: ``valid`` where both labels are
        valid (and ``i + o`` inside), ``different`` where they are valid and differ.
    """
    lab = np.asarray(labels, np.float64)
    lab = np.where((lab >= 0) & (lab < num_classes), lab, np.nan)
    nbr = np.stack([shifted(lab, o) for o in chosen], -1)
    valid = ~np.isnan(lab)[..., None] & ~np.isnan(nbr)
    return valid & (lab[..., None] != nbr), valid


def edge_map(pairs: np.ndarray) -> np.ndarray:
    """A cell's edge strength: ``1 - `` the mean coupling of its pairs ``(i, i + o)``.

    Args:
        pairs: (H, W, P) couplings (NaN: no pair).

    Returns:
        (H, W) float64 (NaN where the cell has no pair).
    """
    ok = ~np.isnan(pairs)
    n = ok.sum(-1)
    mean = np.where(n > 0, np.where(ok, pairs, 0).sum(-1) / np.maximum(n, 1), np.nan)
    return 1.0 - mean


# ----------------------------------------------------------------------------- scores


def _ranks(x):
    from scipy.stats import rankdata

    return rankdata(x)


def edge_scores(coupling, kernel, different) -> dict:
    """How edge-like one map is, over pooled pairs.

    Args:
        coupling: (P,) the method's couplings.
        kernel: (P,) the colour kernel's on the same pairs.
        different: (P,) bool, the pairs whose labels differ.

    Returns:
        ``{"pairs", "different_label_fraction", "spearman_kernel", "pearson_kernel", "label_auc",
        "kernel_label_auc", "coupling_same", "coupling_diff", "kernel_same", "kernel_diff",
        "diff_over_same", "kernel_diff_over_same", "coupling_p5", "coupling_p95"}`` (module docstring;
        NaN where undefined, e.g. a constant map's correlation).
    """
    c, k, d = (np.asarray(v, np.float64).ravel() for v in (coupling, kernel, different))
    d = d.astype(bool)

    def corr(a, b):
        if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
            return float("nan")
        return float(np.corrcoef(a, b)[0, 1])

    def auc(v):  # P(v_diff < v_same), ties half (Mann-Whitney on -v)
        n1, n0 = int(d.sum()), int((~d).sum())
        if n1 == 0 or n0 == 0:
            return float("nan")
        r = _ranks(-v)
        return float((r[d].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))

    def mean(v, m):
        return float(v[m].mean()) if m.any() else float("nan")

    return {"pairs": int(c.size), "different_label_fraction": float(d.mean()) if c.size else float("nan"),
            "spearman_kernel": corr(_ranks(c), _ranks(k)) if c.size > 1 else float("nan"),
            "pearson_kernel": corr(c, k), "label_auc": auc(c), "kernel_label_auc": auc(k),
            "coupling_same": mean(c, ~d), "coupling_diff": mean(c, d),
            "kernel_same": mean(k, ~d), "kernel_diff": mean(k, d),
            "diff_over_same": mean(c, d) / mean(c, ~d) if (d.any() and (~d).any()) else float("nan"),
            "kernel_diff_over_same": mean(k, d) / mean(k, ~d) if (d.any() and (~d).any()) else float("nan"),
            "coupling_p5": float(np.percentile(c, 5)) if c.size else float("nan"),
            "coupling_p95": float(np.percentile(c, 95)) if c.size else float("nan")}


# ----------------------------------------------------------------------------- runs


def run_couplings(config, graphdef, state):
    """A function from one image to the run's couplings on its grid and stencil.

    Args:
        config: a loaded run's config (:func:`rwseg.train.evaluate.load_run`).
        graphdef: its model's graph definition.
        state: its restored state.

    Returns:
        ``(fn, offsets, factor, kind)``: ``fn(image)`` maps a normalised (1, H, W, 3) image (H, W
        divisible by ``factor``) to the (H / factor, W / factor, N) numpy couplings on ``offsets``
        (module docstring); ``factor`` is the grid's downsampling; ``kind`` names what ``c`` is.
    """
    import jax
    import jax.numpy as jnp

    from rwseg.spn import direction_offsets, DIRECTIONS
    from rwseg.stencil import dilated_offsets, disk_offsets
    from rwseg.train.state import merge

    method = config.method
    model = merge(graphdef, state)
    layer = getattr(model, "refinement", None)
    if method == "rwn":
        offsets, factor = layer.eval_offsets, layer.downsample
        kind = "RWN affinity (test disk)"

        def couplings(m, x):
            return m.refinement.affinities(x, m.backbone(x)["stem"])[0]
    elif method == "gcrf":
        offsets, factor = layer.offsets, layer.downsample
        kind = "GCRF similarity"

        def couplings(m, x):
            out = m.backbone(x)
            return m.refinement.similarity(x, out["features"], features_grid=m.backbone.grid(x.shape[1:3]),
                                           train=True)[0]  # the training grid and window: layer.offsets
    elif method == "spn":
        middle = 1  # gate k = 1 of the three-way stencil: d = 0, the previous column / row itself
        offsets = tuple(direction_offsets(d, 3)[middle] for d in DIRECTIONS)
        factor = layer.downsample
        kind = "SPN |middle gate|, mean over classes"

        def couplings(m, x):
            gates = m.refinement.guidance_gates(m.guidance(x, m.backbone(x)))[0]  # (4, h, w, K, 3)
            return jnp.moveaxis(jnp.abs(gates[..., middle]).mean(-1), 0, -1)
    elif method == "dilated":
        rate = layer.rates[0]
        offsets, factor = dilated_offsets((rate,)), 1
        mu = layer.mu
        kind = f"dilated sigmoid(mu * logit), rate {rate}"

        def couplings(m, x):
            out = m.backbone(x)
            logits = m.refinement.affinity_logits(x, *m._head_inputs(x, out),
                                                  features_grid=m.backbone.grid(x.shape[1:3]))[0]
            return jax.nn.sigmoid(mu * logits[..., :len(offsets)])  # the smallest rate's offsets come first
    elif layer is None:
        offsets, factor = disk_offsets(1), 1
        kind = "control prediction: same predicted label (not an affinity)"

        def couplings(m, x):
            pred = jnp.argmax(m.predict(x), axis=-1)[0]
            return jnp.stack([(pred == jnp.roll(pred, (-o[0], -o[1]), (0, 1))).astype(jnp.float32)
                              for o in offsets], -1)  # wrapped pairs are dropped by pair_couplings
    else:
        raise ValueError(f"runs: no affinity panel for method {method!r} (expected rwn, gcrf, spn, dilated, "
                         "or a run without a refinement layer)")
    fn = jax.jit(lambda s, x: couplings(merge(graphdef, s), x))
    return (lambda image: np.asarray(fn(state, jnp.asarray(image)))), tuple(offsets), int(factor), kind


def photos(source, num: int) -> list[dict]:
    """The first ``num`` photos of a split.

    Args:
        source: a :func:`rwseg.data.load_source` split.
        num: how many (at most the split's size).

    Returns:
        ``[{"image": (H, W, 3) uint8, "label": (H, W) int}]``.
    """
    return [{"image": np.asarray(source[i]["image"]), "label": np.asarray(source[i]["label"])}
            for i in range(min(int(num), len(source)))]


def photo_maps(fn, offsets, factor: int, photo: dict, num_classes: int, *, sigma: float = 0.05) -> dict:
    """One run's maps on one photo.

    Args:
        fn, offsets, factor: :func:`run_couplings`.
        photo: ``{"image": (H, W, 3) uint8, "label": (H, W) int}``.
        num_classes: K.
        sigma: the colour kernel's bandwidth.

    Returns:
        ``{"coupling", "kernel", "different", "valid"}``, each (h, w, P) on the grid
        (``h = ceil(H / factor)``), P = :func:`nearest_offsets` of ``offsets``; ``"chosen"``, the
        offsets; ``"image01"``, the image as the layer sees it in [0, 1] on the grid.
    """
    import jax.numpy as jnp

    from rwseg import data
    from rwseg.layers.grid import subsample_labels

    image, label = photo["image"], photo["label"]
    h, w = label.shape
    ph, pw = -(-h // factor) * factor, -(-w // factor) * factor
    norm = np.zeros((ph, pw, 3), np.float32)  # padded bottom/right with image 0, as the evaluation does
    norm[:h, :w] = data.normalize(image)
    lab = np.full((ph, pw), data.IGNORE_INDEX, np.int32)
    lab[:h, :w] = label
    gh, gw = -(-h // factor), -(-w // factor)
    chosen = nearest_offsets(offsets)
    weights = fn(norm[None])[:gh, :gw]
    std, mean = np.asarray(data.DEFAULT_STD, np.float64), np.asarray(data.DEFAULT_MEAN, np.float64)
    image01 = pool((norm.astype(np.float64) * std + mean) / 255.0, factor)[:gh, :gw]
    cells = np.asarray(subsample_labels(jnp.asarray(lab[None]), factor, num_classes))[0][:gh, :gw]
    different, valid = label_pairs(cells, chosen, num_classes)
    coupling = pair_couplings(weights, offsets, chosen)
    kernel = colour_kernel(image01, chosen, sigma)
    valid &= ~np.isnan(coupling) & ~np.isnan(kernel)
    return {"coupling": coupling, "kernel": kernel, "different": different, "valid": valid,
            "chosen": chosen, "image01": image01}


# ----------------------------------------------------------------------------- figure


def _norm(e):
    lo, hi = np.nanpercentile(e, 1), np.nanpercentile(e, 99)
    return np.clip((e - lo) / max(hi - lo, 1e-12), 0, 1)


def _upsample(e, factor, shape):
    return np.repeat(np.repeat(e, factor, 0), factor, 1)[: shape[0], : shape[1]]


def _range(c):
    c = c[~np.isnan(c)]
    return f"c {np.percentile(c, 5):.2f}-{np.percentile(c, 95):.2f}" if c.size else ""


def draw(rows: list[list[tuple[str, np.ndarray, str]]], out, *, dpi: int = 75) -> None:
    """Save the panel grid.

    Args:
        rows: per photo a list of ``(kind, array, title)`` with kind ``"image"`` ((H, W, 3) uint8),
            ``"label"`` ((H, W) int, 255 ignored) or ``"edge"`` ((H, W) float in [0, 1], NaN blank).
        out: the image path (its suffix picks the format; a PNG is saved with a 256-colour palette).
        dpi: resolution (each panel is 1.7 inches wide).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nr, nc = len(rows), max(len(r) for r in rows)
    h, w = rows[0][0][1].shape[:2]
    cw = 1.7
    height = cw * h / w * nr + 0.45 * nr + 0.3
    fig, axes = plt.subplots(nr, nc, figsize=(cw * nc, height), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(nc):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(row):
                continue
            kind, arr, title = row[c]
            if kind == "image":
                ax.imshow(arr)
            elif kind == "label":
                ax.imshow(np.ma.masked_equal(arr, 255), cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
            else:
                ax.imshow(arr, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=6)
    fig.suptitle("edge strength 1 - c (dark = weak coupling), normalised per map; c: raw 5-95th percentile",
                 fontsize=7)
    fig.tight_layout(pad=0.2, h_pad=0.8, w_pad=0.1, rect=(0, 0, 1, 1 - 0.3 / height))
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".png":  # a 256-colour palette keeps the file small (gray maps, a few photos)
        import io

        from PIL import Image

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        Image.open(buf).convert("RGB").quantize(256).save(out, optimize=True)
    else:
        fig.savefig(out, dpi=dpi)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def affinity_panels(runs, *, out, num_images: int = 4, split: str = "validation", sigma: float = 0.05,
                    densecrf_sxy: float = 80.0, densecrf_srgb: float = 5.0, dpi: int = 75) -> list[dict]:
    """Draw the figure and score every map (module docstring).

    Args:
        runs: run directories.
        out: the figure's path.
        num_images: photos (the first of ``split``).
        split: ``"validation"`` (dev) or ``"train"``.
        sigma: the colour kernel's bandwidth ([0, 1] units).
        densecrf_sxy, densecrf_srgb: DenseCRF's bilateral bandwidths (pixels, 0..255 units).
        dpi: the figure's resolution (:func:`draw`).

    Returns:
        One dict per map (the references first, then the runs), as printed.
    """
    from rwseg import data
    from rwseg.train import parallel
    from rwseg.train.evaluate import load_run
    from rwseg.train.state import source_kwargs

    mesh = parallel.make_mesh()
    loaded = [load_run(r, mesh, checkpoint="latest") for r in runs]
    config0 = loaded[0][0]
    source = data.load_source(config0.data.name, split, **source_kwargs(config0))
    shots = photos(source, num_images)
    k = loaded[0][1].num_classes
    results, rows = [], [[("image", p["image"], f"{split} #{i}"), ("label", p["label"], "ground truth")]
                         for i, p in enumerate(shots)]

    # references on the full-resolution 4-neighbours
    ref = {"colour": [], "crf": []}
    for i, p in enumerate(shots):
        image01 = p["image"].astype(np.float64) / 255.0
        different, valid = label_pairs(p["label"], FULL_RES_OFFSETS, k)
        kern = colour_kernel(image01, FULL_RES_OFFSETS, sigma)
        crf = densecrf_bilateral(p["image"].astype(np.float64), FULL_RES_OFFSETS, sxy=densecrf_sxy, srgb=densecrf_srgb)
        valid &= ~np.isnan(kern)
        ref["colour"].append((kern, kern, different, valid))
        ref["crf"].append((crf, kern, different, valid))
        stencil = f"full res, {_offsets_text(FULL_RES_OFFSETS)}"
        rows[i].append(("edge", _norm(edge_map(kern)), f"colour kernel s={sigma:g}\n{stencil}\n{_range(kern)}"))
        rows[i].append(("edge", _norm(edge_map(crf)), f"DenseCRF bilateral {densecrf_sxy:g}/{densecrf_srgb:g}\n{stencil}\n"
                                                       f"{_range(crf)}"))
    for name, key in ((f"{REFERENCE} sigma {sigma:g}", "colour"),
                      (f"DenseCRF bilateral sxy {densecrf_sxy:g} srgb {densecrf_srgb:g}", "crf")):
        results.append({"reference": name, "grid": 1, "offsets": [list(o) for o in FULL_RES_OFFSETS],
                        "images": len(shots), **_pooled(ref[key])})

    shown = {(1, FULL_RES_OFFSETS)}
    for workdir, (config, setup, state, step) in zip(runs, loaded):
        fn, offsets, factor, kind = run_couplings(config, setup.graphdef, state)
        name = pathlib.Path(workdir).name
        title = f"{name}: prediction edges" if kind.startswith("control prediction") else name
        per = []
        for i, p in enumerate(shots):
            m = photo_maps(fn, offsets, factor, p, k, sigma=sigma)
            per.append((m["coupling"], m["kernel"], m["different"], m["valid"]))
            shape = p["label"].shape
            grid = f"1/{factor}" if factor > 1 else "full res"
            rows[i].append(("edge", _upsample(_norm(edge_map(m["coupling"])), factor, shape),
                            f"{title}\n{grid}, {_offsets_text(m['chosen'])}\n{_range(m['coupling'])}"))
            if (factor, m["chosen"]) not in shown:
                rows[i].append(("edge", _upsample(_norm(edge_map(m["kernel"])), factor, shape),
                                f"colour kernel s={sigma:g}\n{grid}, {_offsets_text(m['chosen'])}\n"
                                f"{_range(m['kernel'])}"))
        shown.add((factor, nearest_offsets(offsets)))
        results.append({"run": str(workdir), "name": name, "method": config.method, "step": int(step),
                        "coupling": kind, "grid": factor, "offsets": [list(o) for o in nearest_offsets(offsets)],
                        "images": len(shots), **_pooled(per)})
    draw(rows, out, dpi=dpi)
    return results


def _offsets_text(chosen):
    return " ".join(f"({dy},{dx})" for dy, dx in chosen)


def _pooled(per) -> dict:
    c, kern, d = ([], [], [])
    for coupling, kernel, different, valid in per:
        c.append(coupling[valid])
        kern.append(kernel[valid])
        d.append(different[valid])
    scores = edge_scores(np.concatenate(c), np.concatenate(kern), np.concatenate(d))
    return {key: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for key, v in scores.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (latest checkpoint of each)")
    parser.add_argument("--out", required=True, help="the figure's path (e.g. panels.png)")
    parser.add_argument("--images", type=int, default=4, help="photos: the first of --split")
    parser.add_argument("--split", default="validation", help=f"one of {SPLITS} (never the test split)")
    parser.add_argument("--sigma", type=float, default=0.05, help="colour kernel bandwidth, rgb in [0, 1]")
    parser.add_argument("--densecrf-sxy", type=float, default=80.0, help="DenseCRF bilateral sxy (pixels)")
    parser.add_argument("--densecrf-srgb", type=float, default=5.0, help="DenseCRF bilateral srgb (0..255)")
    parser.add_argument("--dpi", type=int, default=75, help="figure resolution (panels 1.7 inches wide)")
    args = parser.parse_args(argv)
    if args.dpi < 10:
        parser.error(f"--dpi: expected an integer >= 10, got {args.dpi}")
    if args.images < 1:
        parser.error(f"--images: expected an integer >= 1, got {args.images}")
    if args.split not in SPLITS:
        parser.error(f"--split: expected one of {SPLITS} (the test split is never used for diagnosis), "
                     f"got {args.split!r}")
    for name in ("sigma", "densecrf_sxy", "densecrf_srgb"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v > 0):
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {v}")
    for r in args.runs:
        if not (pathlib.Path(r) / "config.json").is_file():
            parser.error(f"runs: {r} is not a run directory (no config.json)")
    for row in affinity_panels(args.runs, out=args.out, num_images=args.images, split=args.split, sigma=args.sigma,
                               densecrf_sxy=args.densecrf_sxy, densecrf_srgb=args.densecrf_srgb, dpi=args.dpi):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
