"""Evaluation of a trained run: metrics table (JSON + markdown) and PNG panels.

``rwseg evaluate --workdir DIR [--checkpoint best|latest] [--baseline_workdir B] [--eval_batches N]``
reads ``DIR/config.json`` (written by ``rwseg.train``), restores the checkpoint and
evaluates on ``config.data.eval_split``. Outputs, in ``DIR/eval/``:

* ``metrics.json`` — mean IoU, frequency-weighted IoU, pixel accuracy, mean accuracy,
  per-class IoU, trimap error per width (``config.trimap_widths``), boundary
  precision/recall/F (``config.boundary_tolerance``), ``nonconverged_fraction`` (the
  fraction of the model's per-image solves that did not converge; 0.0 for methods
  without a solver at evaluation), the checkpoint step;
* ``metrics.md`` — the same as a markdown table row;
* for a method that trains from targets it computes itself (RAWKS: the propagated
  labels P; the model's ``targets``) also ``train_P_*``: those targets on training images
  (:func:`evaluate_propagation`);
* ``panels.png`` — image | ground truth | [baseline] | prediction for the first
  ``config.num_panels`` evaluation images.

Metric counts (confusion matrix, trimap and boundary counts of :mod:`rwseg.metrics`,
:func:`metric_counts`, the one place they are counted) are computed inside the jitted
evaluation step on the sharded batch and summed on the host (:func:`accumulate`), so the
result does not depend on the device count.

Every image is predicted at its own size (:func:`eval_batches`): the split is grouped by
image shape and each batch holds images of one shape only, so no padding pixel ever
enters the network. Padding would not be neutral: GroupNorm statistics are taken over
the whole (padded) image and the convolutions near the border see the padding (on
Stanford Background, padding every image to 320x320 cost 5-7 mIoU). Padding minimally
(to a multiple of 8) and masking it out of the normalisation would still leave the
padding in the receptive field of the border convolutions, and would need a masked
GroupNorm in every model; grouping is exact and costs one compilation per distinct
shape (7 shapes for the 72 Stanford validation images). Methods that average-pool their
maps by a factor (GCRF, RWN, RAWKS, SPN with ``downsample > 1``) need sizes divisible by
it: their images alone are padded to the next multiple (:func:`eval_multiple`; at most
``factor - 1`` rows/columns, labels ignored there). The last batch of a group is
filled with ignore-only examples (label 255 everywhere); the models act per example (no
BatchNorm), so these change nothing and count nowhere. ``config.eval_batches = N``
evaluates the first ``N * config.eval_batch_size`` images of the split; ``0`` the whole
split (the setting for benchmarks).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from rwseg import data, metrics
from rwseg.models import model_class
from rwseg.layers.device_local import batch_axis
from rwseg.train import parallel
from rwseg.train.panels import save_panels
from rwseg.train.state import merge, source_kwargs

__all__ = ["metric_counts", "solve_counts", "accumulate", "make_eval_step", "shape_groups", "eval_multiple",
           "eval_batches", "stack_padded", "evaluate", "evaluate_propagation", "summarize_counts", "markdown_table",
           "write_results", "load_run", "predict_panels", "evaluate_run"]


def metric_counts(pred, labels, *, num_classes: int, widths, tolerance) -> dict:
    """The integer counts every score of an evaluation is computed from (summed over the
    leading axes; ``jax.vmap`` it for per-image counts).

    Args:
      pred: (..., H, W) int predictions.
      labels: (..., H, W) int labels (``ignore_index`` 255 / out of range: ignored).
      num_classes: K.
      widths: trimap band widths in pixels.
      tolerance: boundary matching tolerance in pixels.

    Returns:
      ``{"confusion": (K, K), "out_of_range": (2,), "trimap": (len(widths), 2), "boundary": (4,)}``
      int counts of :func:`rwseg.metrics.confusion_matrix` (with ``return_out_of_range=True``:
      the pixels left out of the matrix because their label or prediction is out of range),
      :func:`rwseg.metrics.trimap_counts` and :func:`rwseg.metrics.boundary_counts` (scores:
      :func:`summarize_counts`).
    """
    confusion, out_of_range = metrics.confusion_matrix(pred, labels, num_classes, return_out_of_range=True)
    return {"confusion": confusion, "out_of_range": out_of_range,
            "trimap": metrics.trimap_counts(pred, labels, widths=tuple(float(w) for w in widths)),
            "boundary": metrics.boundary_counts(pred, labels, tolerance=float(tolerance))}


def solve_counts(info: dict, labels, num_classes: int):
    """``[non-converged solves, solves]`` (2,) int of the examples with a labelled pixel.

    Args:
      info: the model's diagnostics, ``{"solves": (B,), "nonconverged": (B,)}``.
      labels: (B, H, W) int; examples without a valid label (padding) count nowhere.
      num_classes: K.

    Returns:
      (2,) int32.
    """
    counted = jnp.any((labels >= 0) & (labels < num_classes), axis=(1, 2)).astype(jnp.int32)
    return jnp.stack([jnp.sum(info["nonconverged"] * counted), jnp.sum(info["solves"] * counted)])


def accumulate(totals, counts):
    """Host-side sum of count dicts (int64): ``totals`` (``None`` at the start) + ``counts``.

    Args:
      totals: a dict of numpy counts, or ``None``.
      counts: a dict of the same keys (device or numpy arrays).

    Returns:
      The summed dict.
    """
    counts = jax.tree.map(lambda a: np.asarray(a, np.int64), counts)
    return counts if totals is None else jax.tree.map(lambda a, b: a + b, totals, counts)


def make_eval_step(graphdef, mesh, num_classes: int, widths, tolerance):
    """The jitted evaluation step over ``mesh``.

    The model's per-example solvers run device-local (traced under
    :func:`rwseg.layers.device_local.batch_axis`).

    Args:
      graphdef: the model's graph definition (:class:`rwseg.train.state.Setup`).
      mesh: the device mesh.
      num_classes: K.
      widths: trimap widths (:func:`metric_counts`).
      tolerance: boundary tolerance (:func:`metric_counts`).

    Returns:
      ``step(state, batch) -> (pred (B, H, W) int32, counts)``: ``batch`` holds ``image``
      (B, H, W, 3) and ``label`` (B, H, W); ``counts`` the batch's :func:`metric_counts` and
      ``"solves"`` (:func:`solve_counts`), replicated.
    """

    def fn(state, batch):
        with batch_axis(mesh):
            scores, info = merge(graphdef, state).predict(batch["image"], return_info=True)
        pred = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        labels = batch["label"]
        counts = metric_counts(pred, labels, num_classes=num_classes, widths=widths, tolerance=tolerance)
        counts["solves"] = solve_counts(info, labels, num_classes)
        return pred, counts

    rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(rep, shard), out_shardings=(shard, rep))


class _Subset:
    """The examples ``indices`` of ``source``, as a random-access source."""

    def __init__(self, source, indices):
        self.source, self.indices = source, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]


def shape_groups(source, limit: int | None = None) -> list[tuple[tuple[int, int], list[int]]]:
    """The examples grouped by image size, in order of first appearance (each read once).

    Args:
      source: a random-access split.
      limit: the first ``limit`` examples (``None``: all).

    Returns:
      ``[((H, W), source indices)]``.
    """
    n = len(source) if not limit else min(int(limit), len(source))
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(n):
        groups.setdefault(tuple(int(d) for d in np.shape(source[i]["label"])[:2]), []).append(i)
    return list(groups.items())


def eval_multiple(config) -> int:
    """The factor the method average-pools its maps by: evaluation images are padded
    bottom/right to a multiple of it.

    Args:
      config: a training config.

    Returns:
      ``config.<method>.layer.eval_downsample`` for a layer with a test-time grid (GCRF),
      else ``config.<method>.layer.downsample`` for a layer that pools (1 for the others).
    """
    layer = model_class(config.method).LAYER
    section = config[config.method].layer if layer is not None else {}
    for key in ("eval_downsample", "downsample"):
        if key in section:
            return max(1, int(section[key]))
    return 1


def eval_batches(config, source, mesh, *, scribbles: bool = False, keys=()):
    """Local (per-process) evaluation batches, each of one image size (module docstring).

    Every process yields the same sequence of shapes and batch sizes; slots past the end
    of a group are ignore-only examples (``valid`` False).

    Args:
      config: the run's config (``eval_batches``, ``eval_batch_size``, ``seed``, the method's
        :func:`eval_multiple`).
      source: the split.
      mesh: the device mesh.
      scribbles: also yield generated ``"scribbles"``.
      keys: more keys of :func:`rwseg.data.make_batches`'s batches to keep (e.g. ``"mask"``,
        the pixels that come from the image).

    Yields:
      Numpy dicts ``{"image" (b, H, W, 3), "label" (b, H, W), "valid" (b,)[, "scribbles"]}``
      with (H, W) the size of the images of one :func:`shape_groups` group, unpadded
      (padded bottom/right to the next multiple of :func:`eval_multiple`, image 0 and label
      ignore, for a method that pools its maps, e.g. 213 -> 216 rows for GCRF at 1/4);
      ``b`` is per group ``min(eval_batch_size, the group size rounded up to the device
      count)`` divided over the processes.
    """
    ndev = mesh.devices.size
    multiple = eval_multiple(config)
    keys = ("image", "label", "valid") + (("scribbles",) if scribbles else ()) + tuple(keys)
    limit = int(config.eval_batches) * int(config.eval_batch_size)
    for shape, indices in shape_groups(source, limit or None):
        size = min(int(config.eval_batch_size), -(-len(indices) // ndev) * ndev)
        local = parallel.local_batch_size(size, mesh)
        for batch in data.make_batches(_Subset(source, indices), batch_size=local, crop_size=None, train=False,
                                       seed=int(config.seed), scribbles=scribbles,
                                       pad_size=tuple(-(-d // multiple) * multiple for d in shape),
                                       shard_index=jax.process_index(), shard_count=jax.process_count()):
            yield {k: np.asarray(batch[k]) for k in keys}


def stack_padded(arrays, fill) -> np.ndarray:
    """Stack arrays of different sizes, padded bottom/right to the largest.

    Args:
      arrays: a list of (H_i, W_i, ...) arrays of one dtype and trailing shape.
      fill: the value of the padding.

    Returns:
      (N, max H_i, max W_i, ...).
    """
    h = max(a.shape[0] for a in arrays)
    w = max(a.shape[1] for a in arrays)
    out = np.full((len(arrays), h, w) + arrays[0].shape[2:], fill, arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0], : a.shape[1]] = a
    return out


def summarize_counts(totals: dict, widths, tolerance) -> dict:
    """The scores of summed counts.

    Args:
      totals: summed :func:`metric_counts` (and optionally ``"solves"``); counts without
        ``"out_of_range"`` (e.g. a subset of the keys) give the region scores unchecked.
      widths: the trimap widths of the counts.
      tolerance: the boundary tolerance of the counts (reported).

    Returns:
      JSON-ready floats: ``mean_iou``, ``fw_iou``, ``pixel_accuracy``, ``mean_accuracy``,
      ``per_class_iou`` (list), ``trimap_error@W`` per width, ``boundary_{precision,recall,fscore}``,
      ``boundary_tolerance``, with ``"out_of_range"`` the integer ``out_of_range_labels`` and
      ``out_of_range_pred`` (pixels left out of the confusion matrix; the region scores are
      NaN when either is nonzero) and, with solves, ``nonconverged_fraction``.
    """
    region = metrics.summarize(totals["confusion"], out_of_range=totals.get("out_of_range"))
    trimap = np.asarray(metrics.summarize_trimap(totals["trimap"]))
    boundary = metrics.summarize_boundary(totals["boundary"])
    out = {k: float(region[k]) for k in ("mean_iou", "fw_iou", "pixel_accuracy", "mean_accuracy")}
    out["per_class_iou"] = [float(v) for v in np.asarray(region["per_class_iou"])]
    if "out_of_range" in totals:  # pixels left out of the confusion matrix (the scores are NaN then)
        out["out_of_range_labels"] = int(region["out_of_range_labels"])
        out["out_of_range_pred"] = int(region["out_of_range_pred"])
    for w, e in zip(widths, trimap):
        out[f"trimap_error@{w:g}"] = float(e)
    out.update({f"boundary_{k}": float(v) for k, v in boundary.items()})
    out["boundary_tolerance"] = float(tolerance)
    if "solves" in totals:  # fraction of the per-example solves that did not converge (0 without solvers)
        nonconverged, solves = (int(v) for v in np.asarray(totals["solves"]))
        out["nonconverged_fraction"] = nonconverged / max(solves, 1)
    return out


def evaluate(config, graphdef, state, mesh, source, *, num_classes: int, num_panels: int = 0,
             propagation: bool = True, batches=None):
    """Evaluate ``state`` on ``source``, each image at its own size (:func:`eval_batches`).

    Args:
      config: the run's config.
      graphdef: the model's graph definition.
      state: the (replicated) train state.
      mesh: the device mesh.
      source: the evaluation split (:func:`rwseg.data.load_source`).
      num_classes: K.
      num_panels: how many evaluated images to keep for panels.
      propagation: for a model with ``targets`` (RAWKS's P), also evaluate those on the
        training split (:func:`evaluate_propagation`); False: the predictions alone.
      batches: local numpy batches (``image``, ``label``; ``valid`` when panels are kept)
        to score instead of :func:`eval_batches` of ``source``, e.g. augmented training crops.

    Returns:
      ``(metrics, panels)``: the :func:`summarize_counts` scores (and ``train_P_*``), and
      the first ``num_panels`` evaluated images (uint8), labels and predictions, padded
      bottom/right to a common size (image 0, label and prediction 255), with ``sizes``
      (N, 2), the true (H, W) of each (``{}`` without panels).
    """
    step = make_eval_step(graphdef, mesh, num_classes, config.trimap_widths, config.boundary_tolerance)
    totals, kept = None, {"images": [], "labels": [], "pred": []}
    for batch in eval_batches(config, source, mesh) if batches is None else batches:
        pred, counts = step(state, parallel.global_batch({k: batch[k] for k in ("image", "label")}, mesh))
        totals = accumulate(totals, parallel.to_host(counts))
        if len(kept["pred"]) < num_panels:
            pred = parallel.to_host(pred)
            rest = parallel.to_host(parallel.global_batch({k: batch[k] for k in ("image", "label", "valid")}, mesh))
            images = data.denormalize(rest["image"])
            for i in np.flatnonzero(rest["valid"])[: num_panels - len(kept["pred"])]:
                kept["images"].append(images[i])
                kept["labels"].append(rest["label"][i])
                kept["pred"].append(pred[i])
    if totals is None:
        raise ValueError(f"eval split {config.data.eval_split!r} of {config.data.name!r} gave no batches")
    result = summarize_counts(totals, [float(w) for w in config.trimap_widths], config.boundary_tolerance)
    if propagation and getattr(model_class(config.method), "targets", None) is not None:
        train_source = data.load_source(config.data.name, config.data.train_split, **source_kwargs(config))
        result.update(evaluate_propagation(config, graphdef, state, mesh, train_source, num_classes=num_classes))
    panels = {}
    if kept["pred"]:
        panels = {"images": stack_padded(kept["images"], 0),
                  "labels": stack_padded(kept["labels"], data.IGNORE_INDEX),
                  "pred": stack_padded(kept["pred"], data.IGNORE_INDEX),
                  "sizes": np.array([p.shape for p in kept["pred"]], np.int32)}
    return result, panels


def evaluate_propagation(config, graphdef, state, mesh, source, *, num_classes: int, batches=None) -> dict:
    """The targets a method trains from, on (training) images with scribbles: RAWKS's P.

    The model provides them (``targets(images, scribbles)``: the targets and their
    uncertainty weights at image resolution, and the solver diagnostics). The RAWKS paper
    evaluates P on the training images (whose dense labels the model never saw) and Q on
    validation.

    Args:
      config: the run's config.
      graphdef: the model's graph definition (a model with ``targets``).
      state: the (replicated) train state.
      mesh: the device mesh.
      source: the split to evaluate on (e.g. the training split).
      num_classes: K.
      batches: local numpy batches (``image``, ``label``, ``scribbles``) to use instead of
        :func:`eval_batches` of ``source``, e.g. the augmented training crops P is computed
        on in training.

    Returns:
      ``train_P_mean_iou``, ``train_P_pixel_accuracy`` (the targets' argmax against the
      dense labels), ``train_P_boundary_{precision,recall,fscore}`` (at
      ``config.boundary_tolerance``, as for the predictions: how sharp the targets are),
      ``train_P_abstain`` (fraction of labelled pixels with uncertainty weight ``w(x) < 0.5``,
      where the paper abstains), ``train_P_nonconverged_fraction`` (fraction of the
      solves that did not converge) and ``train_P_out_of_range_{labels,pred}`` (integer
      counts of the pixels left out of the confusion matrix; the region scores are NaN when
      either is nonzero).
    """

    def fn(state, batch):
        with batch_axis(mesh):
            p, w, info = merge(graphdef, state).targets(batch["image"], batch["scribbles"])
        pred = jnp.argmax(p, axis=-1).astype(jnp.int32)
        labels = batch["label"]
        valid = (labels >= 0) & (labels < num_classes)
        counts = metric_counts(pred, labels, num_classes=num_classes, widths=config.trimap_widths,
                               tolerance=config.boundary_tolerance)
        return {"confusion": counts["confusion"], "out_of_range": counts["out_of_range"],
                "boundary": counts["boundary"],
                "abstain": jnp.stack([jnp.sum(valid & (w < 0.5)), jnp.sum(valid)]),
                "solves": solve_counts(info, labels, num_classes)}

    rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    step = jax.jit(fn, in_shardings=(rep, shard), out_shardings=rep)
    totals = None
    for batch in eval_batches(config, source, mesh, scribbles=True) if batches is None else batches:
        batch = {k: batch[k] for k in ("image", "label", "scribbles")}
        totals = accumulate(totals, parallel.to_host(step(state, parallel.global_batch(batch, mesh))))
    region = metrics.summarize(totals["confusion"], out_of_range=totals["out_of_range"])
    boundary = {f"train_P_boundary_{k}": float(v) for k, v in metrics.summarize_boundary(totals["boundary"]).items()}
    return {"train_P_mean_iou": float(region["mean_iou"]), "train_P_pixel_accuracy": float(region["pixel_accuracy"]),
            "train_P_out_of_range_labels": int(region["out_of_range_labels"]),
            "train_P_out_of_range_pred": int(region["out_of_range_pred"]),
            **boundary,
            "train_P_abstain": float(totals["abstain"][0] / max(int(totals["abstain"][1]), 1)),
            "train_P_nonconverged_fraction": float(totals["solves"][0] / max(int(totals["solves"][1]), 1))}


def markdown_table(rows, widths) -> str:
    """The metrics as a markdown table (method | mIoU | fw-IoU | pixel acc | trimap | boundary F).

    Args:
      rows: ``[(name, metrics dict of summarize_counts)]``.
      widths: the trimap widths.

    Returns:
      The table (values in %).
    """
    widths = [float(w) for w in widths]
    head = ["method", "mIoU", "fw-IoU", "pixel acc"] + [f"trimap err @{w:g}" for w in widths] + ["boundary F"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows:
        cells = [name] + [f"{100 * m[k]:.1f}" for k in ("mean_iou", "fw_iou", "pixel_accuracy")]
        cells += [f"{100 * m[f'trimap_error@{w:g}']:.1f}" for w in widths] + [f"{100 * m['boundary_fscore']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n(all in %)\n"


def write_results(workdir, name: str, result: dict, widths) -> pathlib.Path:
    """Write ``workdir/eval/metrics.json`` and ``metrics.md``.

    Args:
      workdir: the run directory.
      name: the method's name in the table.
      result: the metrics dict.
      widths: the trimap widths.

    Returns:
      The eval directory.
    """
    out = pathlib.Path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(dict(result, method=name), indent=2))
    (out / "metrics.md").write_text(markdown_table([(name, result)], widths))
    return out


# --------------------------------------------------------------------------- saved runs


def load_run(workdir, mesh, *, checkpoint: str = "best"):
    """A saved run, ready to evaluate.

    Args:
      workdir: the run directory.
      mesh: the device mesh.
      checkpoint: ``"best"`` (falls back to the latest checkpoint when no best one exists)
        or ``"latest"``.

    Returns:
      ``(config, Setup, restored replicated state, step)``; the config is the run's latest
      (:func:`rwseg.train.workdir.load_config`, upgraded).

    Raises:
      FileNotFoundError: no config or no checkpoint.
    """
    from rwseg.train.checkpoint import Checkpoints
    from rwseg.train.state import compute_statistics, create
    from rwseg.train.workdir import load_config

    config = load_config(workdir)
    info = data.dataset_info(config.data.name)
    source = data.load_source(config.data.name, config.data.train_split, **source_kwargs(config))
    setup = create(config, info.num_classes, compute_statistics(config, source), pretrained=False)  # restored below
    template = parallel.replicate(setup.state, mesh)
    ckpts = Checkpoints(workdir, read_only=True)
    restored = ckpts.restore(template, which=checkpoint)
    if restored is None and checkpoint == "best":
        restored = ckpts.restore(template, which="latest")
    if restored is None:
        raise FileNotFoundError(f"workdir: no checkpoint found under {pathlib.Path(workdir) / 'checkpoints'}")
    ckpts.close()
    step, state = restored
    return config, setup, state, step


def predict_panels(config, setup, state, mesh, images):
    """Predictions for panel images.

    Args:
      config: the run's config.
      setup: its :class:`rwseg.train.state.Setup`.
      state: its replicated state.
      mesh: the device mesh.
      images: (N, H, W, 3) normalised, N a multiple of the device count.

    Returns:
      (N, H, W) int32 predictions.
    """
    step = make_eval_step(setup.graphdef, mesh, setup.num_classes, config.trimap_widths, config.boundary_tolerance)
    labels = np.full(images.shape[:3], data.IGNORE_INDEX, np.int32)
    pred, _ = step(state, parallel.global_batch({"image": images, "label": labels}, mesh))
    return parallel.to_host(pred)


def evaluate_run(workdir, *, checkpoint: str = "best", baseline_workdir: str = "", name: str | None = None,
                 eval_batches: int | None = None):
    """Evaluate a saved run and write its results and panels into ``workdir/eval``.

    Args:
      workdir: the run directory.
      checkpoint: ``"best"`` or ``"latest"``.
      baseline_workdir: another run whose predictions join the panels (default: the
        config's ``baseline_workdir``).
      name: the method's name in the table (default: ``config.method``).
      eval_batches: overrides the run's ``config.eval_batches`` (0 = the whole split).

    Returns:
      ``(metrics, eval dir)``.
    """
    mesh = parallel.make_mesh()
    config, setup, state, step = load_run(workdir, mesh, checkpoint=checkpoint)
    if eval_batches is not None:
        config.eval_batches = int(eval_batches)
    source = data.load_source(config.data.name, config.data.eval_split, **source_kwargs(config))
    result, panels = evaluate(config, setup.graphdef, state, mesh, source, num_classes=setup.num_classes,
                              num_panels=int(config.num_panels))
    result["step"] = int(step)
    name = name or config.method
    out = write_results(workdir, name, result, config.trimap_widths)
    baseline_workdir = baseline_workdir or config.baseline_workdir
    if panels and jax.process_index() == 0:
        columns = {"ground truth": panels["labels"]}
        if baseline_workdir:
            title = "baseline" if name != "baseline" else f"baseline ({pathlib.Path(baseline_workdir).name})"
            columns[title] = _baseline_predictions(baseline_workdir, mesh, panels, config)
        columns[name] = panels["pred"]
        save_panels(out / "panels.png", panels["images"], columns, setup.num_classes)
    return result, out


def _baseline_predictions(baseline_workdir, mesh, panels, config):
    """Predictions of another saved run on the panel images, each at its own size
    (``panels`` from :func:`evaluate`: padded uint8 images and their ``sizes``)."""
    b_config, b_setup, b_state, _ = load_run(baseline_workdir, mesh)
    images = data.normalize(panels["images"])
    out = np.full(images.shape[:3], data.IGNORE_INDEX, np.int32)
    ndev = mesh.devices.size
    sizes = [tuple(int(v) for v in s) for s in panels["sizes"]]
    for h, w in sorted(set(sizes)):
        idx = [i for i, s in enumerate(sizes) if s == (h, w)]
        batch = images[idx, :h, :w]
        fill = -len(idx) % ndev  # repeat the last image up to a multiple of the device count
        batch = np.concatenate([batch, np.repeat(batch[-1:], fill, axis=0)]).astype(np.float32)
        out[idx, :h, :w] = predict_panels(b_config, b_setup, b_state, mesh, batch)[: len(idx)]
    return out
