"""The refinement benchmark: every method trained on top of one baseline checkpoint,
against the control of training that baseline for as long.

    python experiments/refine_benchmark.py --base RUN --steps N [--seeds 0,1,2]
        [--methods spn,rwn,gcrf,dilated] --out OUT [--config experiments/configs/stanford_refine.py]

Protocol (the SPN paper's, §5: the refinement is trained on top of a trained base network):

1. ``RUN`` is a trained baseline (e.g. ``experiments/configs/stanford_baseline.py``);
2. for each seed, the control (``baseline``) and each method train ``N`` steps from
   ``RUN``'s backbone (``config.init_from``, :mod:`rwseg.train.init_from`; fine-tuned,
   fresh optimiser state, the same schedule for all) with the config
   ``<config>:<method>``, in ``OUT/seed<s>/<method>`` — same seed, hence the same batches
   and crops, for the control and every method of a seed. Finished runs are reused
   (a run resumes from its own checkpoints), so the command can be re-run after an
   interruption or with more seeds/methods;
3. each run's last checkpoint is evaluated on the whole evaluation split, every image at
   its own size (:func:`rwseg.train.evaluate.eval_batches`), keeping the per-image
   counts (confusion matrix, trimap and boundary counts) in
   ``OUT/seed<s>/<method>/eval/per_image.npz`` (reused when its step is the run's);
4. ``OUT/results.md`` (and ``results.json``): per method mIoU, fw-IoU, pixel accuracy,
   trimap errors and boundary F as mean +- std over seeds; the difference to the control
   with its paired bootstrap 95 % interval over the images (:mod:`experiments.bootstrap`,
   paired by image and seed); training time per step relative to the control (median over
   logging intervals, first one excluded: it holds the compilation);
5. ``OUT/panels.png``: image | ground truth | control | each method, for the first
   evaluation images, first seed.

The base run's ``data.manual_dir`` is used unless ``--manual_dir`` is given.

The same driver compares methods trained **from scratch** against a control other than
``baseline`` (``--base`` left out, ``--control NAME``): RAWKS against the scribble-only
baseline (``--config experiments/configs/stanford_scribbles.py --control
scribble_baseline --methods rawks``). For a RAWKS run the table also reports its
propagated labels P on the training images and the abstention rate
(:func:`propagation_metrics`, the paper's P; Q is the network's row in the table).

``--base`` may also give each run its own base, as comma-separated ``METHOD=RUN`` entries
(one per run, the control included), with ``{seed}`` in ``RUN`` standing for the seed
(:func:`parse_base`): a second training stage compared with a control trained for as many
steps, e.g. RAWKS's "train P, Q, then Q" (``rawks_then_q`` from each seed's finished
``rawks`` run) against the scribble-only run of the same seed trained on for as long::

    python experiments/refine_benchmark.py --config experiments/configs/stanford_scribbles.py \
        --base "scribble_baseline=S/seed{seed}/scribble_baseline,rawks_then_q=S/seed{seed}/rawks" \
        --control scribble_baseline --methods rawks_then_q --steps 200 --seeds 2 --out OUT
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root holds rwseg and experiments
    sys.path.insert(0, str(ROOT))

__all__ = ["DEFAULT_METHODS", "parse_base", "base_of", "run_config", "train_run", "per_image_counts", "evaluate_images",
           "propagation_metrics", "step_seconds", "summarize", "markdown", "run", "main"]

DEFAULT_METHODS = ("spn", "rwn", "gcrf", "dilated")
CONTROL = "baseline"
PROPAGATION = (("train_P_mean_iou", "P mIoU"), ("train_P_pixel_accuracy", "P pixel acc"),
               ("train_P_boundary_fscore", "P boundary F"),
               ("train_P_abstain", "abstention"), ("train_P_nonconverged_fraction", "non-converged solves"))
METRICS = (("mean_iou", "mIoU"), ("fw_iou", "fw-IoU"), ("pixel_accuracy", "pixel acc"))


def parse_base(spec: str | None):
    """``--base`` -> ``None`` (from scratch), one run for every method (a str), or
    ``{method: run}`` from comma-separated ``METHOD=RUN`` entries (module docstring)."""
    if not spec:
        return None
    if "=" not in spec:
        return spec
    entries = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        method, sep, run = part.partition("=")
        if not sep or not method.strip() or not run.strip() or method.strip() in entries:
            raise ValueError(f"--base: expected RUN or comma-separated METHOD=RUN entries (one per method), "
                             f"got {spec!r}")
        entries[method.strip()] = run.strip()
    return entries


def base_of(base, method: str, seed: int):
    """The base run of ``method``'s run of ``seed`` (:func:`parse_base`'s value; ``None`` = from scratch)."""
    if isinstance(base, dict):
        if method not in base:
            raise ValueError(f"--base: no METHOD=RUN entry for {method!r} (entries for {sorted(base)})")
        return base[method].replace("{seed}", str(seed))
    return None if base is None else str(base).replace("{seed}", str(seed))


def run_config(config_path, method: str, *, base=None, steps: int, seed: int, smoke: bool = False,
               manual_dir: str | None = None):
    """The config of one run: ``<config_path>:<method>[,smoke]`` + the protocol's settings.

    ``base``: the trained run every run starts from (``init_from``; its ``data.manual_dir``
    is the default data folder), or ``None`` to train from scratch (the config's data folder).
    """
    from rwseg.train.config_files import load_config_file
    from rwseg.train.workdir import load_config

    c = load_config_file(str(config_path), method + (",smoke" if smoke else ""))
    if base is not None:
        c.init_from = str(base)
        if manual_dir is None:
            manual_dir = load_config(base).data.manual_dir
    c.num_steps = int(steps)
    c.checkpoint_every = int(steps)
    c.seed = int(seed)
    c.eval_at_end = False
    c.progress = False
    if manual_dir is not None and c.data.name != "synthetic":
        c.data.manual_dir = manual_dir
    return c


def _finished(workdir, steps: int) -> bool:
    return (pathlib.Path(workdir) / "checkpoints" / str(steps) / "default").is_dir()


def train_run(config, workdir) -> None:
    """Train (or resume, or do nothing for a finished run) one run of the protocol."""
    from rwseg.train.trainer import train_and_evaluate

    if _finished(workdir, int(config.num_steps)):
        return
    print(f"== {workdir}: {config.method}, {config.num_steps} steps, seed {config.seed}", flush=True)
    train_and_evaluate(config, workdir)


# Methods whose scores are probabilities (GMF marginals, propagated softmax); the others give
# logits. DenseCRF's unary is -log p of either (:func:`scores_to_probs`).
PROBABILITY_SCORES = ("gcrf", "dilated")


def scores_to_probs(scores, method: str):
    """A model's class scores (B, H, W, K) -> probabilities for DenseCRF's unary: the softmax of
    logits, or for :data:`PROBABILITY_SCORES` methods the scores clipped at 1e-8 and renormalised."""
    import jax
    import jax.numpy as jnp

    if method in PROBABILITY_SCORES:
        p = jnp.clip(scores, 1e-8, None)
        return p / jnp.sum(p, axis=-1, keepdims=True)
    return jax.nn.softmax(scores, axis=-1)


def _network_outputs(config, graphdef, state, mesh, source, *, num_classes: int, probs: bool = False):
    """The network on the whole ``source`` (each image at its own size), one eval batch at a time.

    Yields ``(pred (B, H, W), batch, keep, probs (B, H, W, K) or None, seconds)``: host arrays of one
    :func:`rwseg.train.evaluate.eval_batches` batch (``batch`` with ``image``, ``label``, ``valid``,
    ``mask``), the indices of its real examples and the network's inference seconds (each batch
    shape compiled before it is timed)."""
    import jax

    from rwseg.layers.device_local import batch_axis
    from rwseg.train import parallel
    from rwseg.train.evaluate import eval_batches, make_eval_step
    from rwseg.train.state import merge

    config.eval_batches = 0
    predict = make_eval_step(graphdef, mesh, num_classes, tuple(float(w) for w in config.trimap_widths),
                             float(config.boundary_tolerance))

    def probs_of(state, image):
        with batch_axis(mesh):
            return scores_to_probs(merge(graphdef, state).predict(image), config.method)

    probs_fn = jax.jit(probs_of, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                       out_shardings=parallel.batch_sharding(mesh))
    compiled = set()
    for batch in eval_batches(config, source, mesh, keys=("mask",)):
        inputs = parallel.global_batch({k: batch[k] for k in ("image", "label")}, mesh)
        if batch["image"].shape not in compiled:  # compile each shape outside the timed call
            compiled.add(batch["image"].shape)
            jax.block_until_ready(predict(state, inputs))
        t0 = time.perf_counter()
        pred = parallel.to_host(predict(state, inputs)[0])
        seconds = time.perf_counter() - t0
        rest = parallel.to_host(parallel.global_batch({k: batch[k] for k in ("image", "label", "valid", "mask")}, mesh))
        p = parallel.to_host(probs_fn(state, parallel.global_batch({"image": batch["image"]}, mesh)["image"])) if probs else None
        yield pred, rest, np.flatnonzero(rest["valid"]), p, seconds


def image_extent(mask) -> tuple[int, int]:
    """The image's own (h, w) inside its padded eval slot (padding is bottom/right).

    Args:
      mask: (H, W) bool, True on the image's own pixels (:func:`rwseg.train.evaluate.eval_batches`'
        ``mask``).

    Returns:
      ``(h, w)``.
    """
    return int(mask.any(1).sum()), int(mask.any(0).sum())


def per_image_counts(config, graphdef, state, mesh, source, *, num_classes: int, num_panels: int = 0,
                     densecrf=None):
    """Per-image counts on the whole ``source`` (each image at its own size).

    Args:
        config, graphdef, state, mesh: a loaded run (:func:`rwseg.train.evaluate.load_run`).
        source: the evaluation split.
        num_classes: K.
        num_panels: keep the first ``num_panels`` images, labels and predictions.
        densecrf: :class:`experiments.densecrf.DenseCRFParams`: also post-process each image's
            probabilities (:func:`scores_to_probs`) with DenseCRF and count its predictions.

    Returns:
        ``(counts, panels)``: ``counts`` = ``{"confusion" (N, K, K), "trimap" (N, W, 2),
        "boundary" (N, 4)}`` int64 in :func:`rwseg.train.evaluate.eval_batches` order (their sum
        over N is what :func:`rwseg.train.evaluate.evaluate` sums), plus ``"seconds"`` (the
        network's inference seconds per image) and, with ``densecrf``, the same counts of the
        post-processed predictions under ``"crf_confusion"``, ``"crf_trimap"``, ``"crf_boundary"``
        and ``"crf_seconds"`` (DenseCRF's seconds per image); ``panels`` = the first
        ``num_panels`` images (uint8), labels and predictions (and ``"crf_pred"``), as lists.
    """
    import jax

    from rwseg import data
    from rwseg.train.evaluate import metric_counts

    widths, tolerance = config.trimap_widths, config.boundary_tolerance
    counts_fn = jax.jit(jax.vmap(lambda p, l: metric_counts(p, l, num_classes=num_classes, widths=widths,
                                                            tolerance=tolerance)))
    keys = ("confusion", "trimap", "boundary")
    rows = {k: [] for k in keys + (tuple("crf_" + k for k in keys) if densecrf is not None else ())}
    panels = {"images": [], "labels": [], "pred": [], "crf_pred": []}
    seconds = {"seconds": 0.0, "crf_seconds": 0.0}
    n = 0
    for pred, rest, keep, probs, t in _network_outputs(config, graphdef, state, mesh, source, num_classes=num_classes,
                                                       probs=densecrf is not None):
        seconds["seconds"] += t
        n += len(keep)
        images = data.denormalize(rest["image"])
        preds = {"": pred}
        if densecrf is not None:
            from experiments.densecrf import densecrf as crf

            refined = pred.copy()
            t0 = time.perf_counter()
            for i in keep:
                h, w = image_extent(rest["mask"][i])
                refined[i, :h, :w] = crf(images[i, :h, :w], probs[i, :h, :w], densecrf).argmax(-1)
            seconds["crf_seconds"] += time.perf_counter() - t0
            preds["crf_"] = refined
        for prefix, pr in preds.items():
            counts = jax.tree.map(np.asarray, counts_fn(pr, rest["label"]))
            for k in keys:
                rows[prefix + k].append(np.asarray(counts[k], np.int64)[keep])
        if len(panels["pred"]) < num_panels:
            for i in keep[: num_panels - len(panels["pred"])]:
                panels["images"].append(images[i])
                panels["labels"].append(rest["label"][i])
                panels["pred"].append(pred[i])
                if densecrf is not None:
                    panels["crf_pred"].append(preds["crf_"][i])
    out = {k: np.concatenate(v) for k, v in rows.items()}
    out.update({k: np.float64(v / max(n, 1)) for k, v in seconds.items()})
    return out, panels


def evaluate_images(workdir, *, split: str = "validation", num_panels: int = 4, densecrf=None) -> dict:
    """Per-image counts (and panel arrays) of a run's latest checkpoint on ``split``, cached in
    ``workdir/eval/per_image[_SPLIT].npz`` (no suffix for ``validation``); returns the npz
    contents as a dict (:func:`per_image_counts`; ``densecrf``: also its post-processed counts,
    under ``crf_*``; the cache is redone when the parameters differ)."""
    import dataclasses

    from rwseg import data
    from rwseg.train import parallel
    from rwseg.train.checkpoint import Checkpoints
    from rwseg.train.evaluate import load_run, stack_padded
    from rwseg.train.state import source_kwargs

    workdir = pathlib.Path(workdir)
    path = workdir / "eval" / ("per_image.npz" if split == "validation" else f"per_image_{split}.npz")
    crf_key = json.dumps(dataclasses.asdict(densecrf), sort_keys=True) if densecrf is not None else ""
    latest = Checkpoints(workdir, read_only=True)
    step = latest.latest_step()
    latest.close()
    if path.exists():
        cached = dict(np.load(path))
        if (int(cached["step"]) == step and len(cached.get("panel_pred", [])) >= num_panels
                and (not crf_key or str(cached.get("densecrf", "")) == crf_key)):
            return cached
    t0 = time.perf_counter()
    mesh = parallel.make_mesh()
    config, setup, state, step = load_run(workdir, mesh, checkpoint="latest")
    source = data.load_source(config.data.name, split, **source_kwargs(config))
    counts, panels = per_image_counts(config, setup.graphdef, state, mesh, source, num_classes=setup.num_classes,
                                      num_panels=num_panels, densecrf=densecrf)
    out = dict(counts, step=np.int64(step), num_classes=np.int64(setup.num_classes),
               trimap_widths=np.asarray(config.trimap_widths, np.float64),
               eval_seconds=np.float64(time.perf_counter() - t0), densecrf=np.str_(crf_key))
    if panels["pred"]:
        out.update(panel_images=stack_padded(panels["images"], 0),
                   panel_labels=stack_padded(panels["labels"], data.IGNORE_INDEX),
                   panel_pred=stack_padded(panels["pred"], data.IGNORE_INDEX))
        if panels["crf_pred"]:
            out["crf_panel_pred"] = stack_padded(panels["crf_pred"], data.IGNORE_INDEX)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **out)
    print(f"   evaluated {workdir} on {split} (step {step}, {len(counts['confusion'])} images) in "
          f"{out['eval_seconds']:.0f} s", flush=True)
    return out


def tune_densecrf(workdir, grid, *, split: str = "validation", out=None) -> tuple:
    """DenseCRF's parameters chosen on ``split`` (the dev split): the setting of ``grid`` with the
    highest mIoU when post-processing the run's probabilities (DeepLab's protocol).

    Args:
        workdir: the run (the control of the first seed).
        grid: :class:`experiments.densecrf.DenseCRFParams` settings to try.
        split: the split that chooses (never the test split).
        out: a JSON file caching ``{"grid": [...], "chosen": index}``.

    Returns:
        ``(params, table)``: the chosen settings and one ``{"params", "mean_iou",
        "boundary_fscore"}`` dict per setting, in ``grid`` order.
    """
    import dataclasses

    from experiments.densecrf import DenseCRFParams, densecrf as crf
    from rwseg import data, metrics
    from rwseg.train import parallel
    from rwseg.train.evaluate import load_run
    from rwseg.train.state import source_kwargs

    if split == "test":
        raise ValueError("split: DenseCRF's parameters are chosen on the dev split (validation), never on test")
    grid = list(grid)
    if out is not None and pathlib.Path(out).exists():
        cached = json.loads(pathlib.Path(out).read_text())
        if [r["params"] for r in cached["grid"]] == [dataclasses.asdict(g) for g in grid]:
            return grid[cached["chosen"]], cached["grid"]
    mesh = parallel.make_mesh()
    config, setup, state, _ = load_run(workdir, mesh, checkpoint="latest")
    source = data.load_source(config.data.name, split, **source_kwargs(config))
    k = setup.num_classes
    items = []  # (image uint8, probs, label) at each image's own size
    for _, rest, keep, probs, _ in _network_outputs(config, setup.graphdef, state, mesh, source, num_classes=k,
                                                    probs=True):
        images = data.denormalize(rest["image"])
        for i in keep:
            h, w = image_extent(rest["mask"][i])
            items.append((images[i, :h, :w], probs[i, :h, :w], rest["label"][i, :h, :w]))
    table = []
    for params in grid:
        conf = np.zeros((k, k), np.int64)
        bnd = np.zeros(4, np.int64)
        for image, probs, label in items:
            pred = crf(image, probs, params).argmax(-1)
            conf += np.asarray(metrics.confusion_matrix(pred, label, k), np.int64)
            bnd += np.asarray(metrics.boundary_counts(pred, label, tolerance=float(config.boundary_tolerance)), np.int64)
        table.append({"params": dataclasses.asdict(params),
                      "mean_iou": float(metrics.summarize(conf)["mean_iou"]),
                      "boundary_fscore": float(metrics.summarize_boundary(bnd)["fscore"])})
        print(f"   densecrf on {split}: {table[-1]}", flush=True)
    chosen = int(np.argmax([r["mean_iou"] for r in table]))
    if out is not None:
        pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(out).write_text(json.dumps({"grid": table, "chosen": chosen, "split": split}, indent=2))
    return DenseCRFParams(**table[chosen]["params"]), table


def propagation_metrics(workdir, *, images: int = 0) -> dict:
    """RAWKS runs: the propagated labels P of the latest checkpoint on the training images
    against their dense labels, the abstention rate and the non-converged solves
    (:func:`rwseg.train.evaluate.evaluate_propagation`), cached in
    ``workdir/eval/propagation.json``; returns ``{"step": int, "images": int, "train_P_*": float}``.

    ``images``: evaluate the first ``images`` training images only, rounded up to a whole
    evaluation batch (0 = every one): P at full resolution costs minutes per hundred images.
    """
    from rwseg import data
    from rwseg.train import parallel
    from rwseg.train.evaluate import evaluate_propagation, load_run
    from rwseg.train.state import source_kwargs

    workdir = pathlib.Path(workdir)
    path = workdir / "eval" / "propagation.json"
    if path.exists():
        from rwseg.train.checkpoint import Checkpoints

        latest = Checkpoints(workdir, read_only=True)
        step = latest.latest_step()
        latest.close()
        cached = json.loads(path.read_text())
        if (cached.get("step") == step and cached.get("requested_images", 0) == int(images)
                and all(k in cached for k, _ in PROPAGATION)):  # a cache from before a new column is redone
            return cached
    mesh = parallel.make_mesh()
    config, setup, state, step = load_run(workdir, mesh, checkpoint="latest")
    # every training image (as per_image_counts evaluates every validation image), or the first ``images``
    config.eval_batches = -(-int(images) // int(config.eval_batch_size)) if images else 0
    source = data.load_source(config.data.name, config.data.train_split, **source_kwargs(config))
    limit = int(config.eval_batches) * int(config.eval_batch_size)
    out = dict(evaluate_propagation(config, setup.graphdef, state, mesh, source, num_classes=setup.num_classes),
               step=int(step), images=min(limit, len(source)) if limit else len(source), requested_images=int(images))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return out


def densecrf_propagation(config, split: str, params, *, images: int = 0) -> dict:
    """DenseCRF label propagation of the generated scribbles (:func:`experiments.densecrf.propagate_scribbles`:
    scribble pixels as hard unaries, uniform elsewhere) on ``split``, scored as RAWKS's P is
    (:func:`propagation_metrics`): the classic P is compared with.

    Args:
        config: a RAWKS run's config (its scribbles: ``config.seed``, the generator's settings).
        split: ``"train"`` (the photos P is reported on) or ``"validation"`` (where the
            parameters are chosen).
        params: :class:`experiments.densecrf.DenseCRFParams`.
        images: the first ``images`` images only, rounded up to a whole evaluation batch
            (0 = every one).

    Returns:
        ``{"train_P_mean_iou", "train_P_pixel_accuracy", "train_P_boundary_fscore", "images"}``
        (abstention and solves do not apply).
    """
    import jax

    from experiments.densecrf import propagate_scribbles
    from rwseg import data, metrics
    from rwseg.train import parallel
    from rwseg.train.evaluate import eval_batches
    from rwseg.train.state import source_kwargs

    config = config.copy_and_resolve_references()
    config.eval_batches = -(-int(images) // int(config.eval_batch_size)) if images else 0
    source = data.load_source(config.data.name, split, **source_kwargs(config))
    k = data.dataset_info(config.data.name).num_classes
    tolerance = float(config.boundary_tolerance)
    counts_fn = jax.jit(jax.vmap(lambda p, l: {"confusion": metrics.confusion_matrix(p, l, k),
                                              "boundary": metrics.boundary_counts(p, l, tolerance=tolerance)}))
    conf, bnd, n = np.zeros((k, k), np.int64), np.zeros(4, np.int64), 0
    for batch in eval_batches(config, source, parallel.make_mesh(), scribbles=True, keys=("mask",)):
        images_u8 = data.denormalize(batch["image"])
        pred = np.zeros(batch["label"].shape, np.int32)
        keep = np.flatnonzero(batch["valid"])
        for i in keep:
            h, w = image_extent(batch["mask"][i])
            pred[i, :h, :w] = propagate_scribbles(images_u8[i, :h, :w], batch["scribbles"][i, :h, :w], k, params).argmax(-1)
        counts = jax.tree.map(np.asarray, counts_fn(pred, batch["label"]))
        conf += counts["confusion"][keep].sum(0)
        bnd += counts["boundary"][keep].sum(0)
        n += len(keep)
    region = metrics.summarize(conf)
    return {"train_P_mean_iou": float(region["mean_iou"]), "train_P_pixel_accuracy": float(region["pixel_accuracy"]),
            "train_P_boundary_fscore": float(metrics.summarize_boundary(bnd)["fscore"]),
            "train_P_abstain": float("nan"), "train_P_nonconverged_fraction": float("nan"), "images": n}


def tune_densecrf_propagation(config, grid, *, images: int = 0, out=None):
    """DenseCRF propagation's parameters chosen on the dev (validation) split's scribbles: the
    setting of ``grid`` with the highest mIoU (:func:`densecrf_propagation`); cached in ``out``
    (JSON). Returns ``(params, table)``."""
    import dataclasses

    from experiments.densecrf import DenseCRFParams

    grid = list(grid)
    if out is not None and pathlib.Path(out).exists():
        cached = json.loads(pathlib.Path(out).read_text())
        if [r["params"] for r in cached["grid"]] == [dataclasses.asdict(g) for g in grid]:
            return grid[cached["chosen"]], cached["grid"]
    table = [dict(densecrf_propagation(config, "validation", g, images=images), params=dataclasses.asdict(g)) for g in grid]
    chosen = int(np.argmax([r["train_P_mean_iou"] for r in table]))
    if out is not None:
        pathlib.Path(out).write_text(json.dumps({"grid": table, "chosen": chosen, "split": "validation"}, indent=2))
    return DenseCRFParams(**table[chosen]["params"]), table


def step_seconds(workdir) -> float:
    """Median seconds per training step over the logging intervals of ``metrics.jsonl``,
    the first interval (compilation) excluded when there are others; NaN without any."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    rates = []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                if entry.get("split") == "train" and entry.get("steps_per_sec"):
                    rates.append(1.0 / float(entry["steps_per_sec"]))
    if len(rates) > 1:
        rates = rates[1:]
    return float(np.median(rates)) if rates else float("nan")


def _score_functions(widths):
    """{metric key: jit(vmap(summed counts dict -> score))} for the table's metrics."""
    import jax

    from rwseg import metrics

    def region(key):
        return lambda c: metrics.summarize(c["confusion"])[key]

    fns = {key: region(key) for key, _ in METRICS}
    for i, w in enumerate(widths):
        fns[f"trimap_error@{w:g}"] = (lambda i: lambda c: metrics.summarize_trimap(c["trimap"])[i])(i)
    fns["boundary_fscore"] = lambda c: metrics.summarize_boundary(c["boundary"])["fscore"]
    return {k: jax.jit(jax.vmap(f)) for k, f in fns.items()}


def _labels(widths):
    return [(k, n) for k, n in METRICS] + [(f"trimap_error@{w:g}", f"trimap err @{w:g}") for w in widths] + [
        ("boundary_fscore", "boundary F")]


def summarize(evals: dict, times: dict, *, num_samples: int = 2000, control: str = CONTROL,
              reference: str | None = None, inference: dict | None = None) -> dict:
    """The numbers of the table.

    Args:
        evals: ``{row: [per-image npz dict per seed]}`` (same seeds, same images, ``control``
            included).
        times: ``{row: [seconds/step per seed]}``.
        num_samples: bootstrap resamples.
        control: the row every other is compared with (``diff``).
        reference: a second row every other is compared with (``diff_reference``), e.g.
            ``"densecrf"``.
        inference: ``{row: [inference seconds per image per seed]}``.

    Returns:
        ``{"widths", "seeds", "images", "control", "reference", "methods": {row: {metric:
        {"per_seed", "mean", "std", "diff"?, "diff_reference"?}, "seconds_per_step",
        "time_ratio", "seconds_per_image"?}}}``; differences are paired bootstrap 95 %
        intervals over images (paired by image and seed).
    """
    from experiments.bootstrap import paired_bootstrap

    widths = [float(w) for w in evals[control][0]["trimap_widths"]]
    fns = _score_functions(widths)
    keys = ("confusion", "trimap", "boundary")
    stacked = {m: {k: np.stack([e[k] for e in runs]) for k in keys} for m, runs in evals.items()}
    n_images = {m: s["confusion"].shape[1] for m, s in stacked.items()}
    if len(set(n_images.values())) != 1:
        raise ValueError(f"runs evaluated on different image counts: {n_images}")
    out = {"widths": widths, "seeds": len(evals[control]), "images": n_images[control], "control": control,
           "reference": reference, "methods": {}}
    for m, s in stacked.items():
        row = {}
        for key, fn in fns.items():
            per_seed = [float(fn({k: v[j].sum(0, keepdims=True) for k, v in s.items()})[0])
                        for j in range(s["confusion"].shape[0])]
            row[key] = {"per_seed": per_seed, "mean": float(np.mean(per_seed)),
                        "std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan")}
            for name, ref in (("diff", control), ("diff_reference", reference)):
                if ref is not None and m not in (control, ref):
                    bs = paired_bootstrap(fn, s, stacked[ref], num_samples=num_samples)
                    row[key][name] = {k: bs[k] for k in ("diff", "low", "high")}
            if m == reference:
                bs = paired_bootstrap(fn, s, stacked[control], num_samples=num_samples)
                row[key]["diff"] = {k: bs[k] for k in ("diff", "low", "high")}
        t = np.asarray(times[m], float)
        row["seconds_per_step"] = float(np.nanmean(t))
        row["time_ratio"] = float(np.nanmean(t / np.asarray(times[control], float)))
        if inference and m in inference:
            row["seconds_per_image"] = float(np.mean(inference[m]))
        out["methods"][m] = row
    return out


def _diff_table(summary, labels, key: str) -> list[str]:
    head = ["method"] + [f"Δ {n}" for _, n in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, row in summary["methods"].items():
        if key not in row[labels[0][0]]:
            continue
        cells = [m]
        for k, _ in labels:
            d = row[k][key]
            cells.append(f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict, *, command: str = "", note: str = "", split: str = "validation") -> str:
    """The results table(s) as markdown (``split``: the split the rows were evaluated on)."""
    labels = _labels(summary["widths"])
    seeds = summary["seeds"]
    control = summary.get("control", CONTROL)
    reference = summary.get("reference")
    pm = (lambda r: f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}") if seeds > 1 else (
        lambda r: f"{100 * r['mean']:.1f}")
    name = {"validation": "Validation (dev)", "test": "Test"}.get(split, split)
    lines = [f"{name}: {summary['images']} images, every image at its own size; {seeds} seed(s)"
             + (" (mean ± std over seeds)" if seeds > 1 else "") + "; all in %.", ""]
    per_image = any("seconds_per_image" in r for r in summary["methods"].values())
    head = ["method"] + [n for _, n in labels] + ["s/step", "time vs control"] + (["s/image (inference)"] if per_image else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, row in summary["methods"].items():
        cells = [f"control ({m})" if m == control else m] + [pm(row[k]) for k, _ in labels]
        cells += [f"{row['seconds_per_step']:.2f}", f"{row['time_ratio']:.1f}x"]
        if per_image:
            cells.append(f"{row['seconds_per_image']:.3f}" if "seconds_per_image" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Difference to the control (row - control, points), with the paired bootstrap 95 % interval "
              f"over {split} images (paired by image and seed; lower is better for trimap error):", ""]
    lines += _diff_table(summary, labels, "diff")
    if reference:
        lines += ["", f"Difference to {reference} (row - {reference}, points), same intervals:", ""]
        lines += _diff_table(summary, labels, "diff_reference")
    if summary.get("propagation"):
        counts = summary.get("propagation_images") or {}
        where = ("the training images" if not counts else "the first " + ", ".join(
            f"{n} ({m})" for m, n in counts.items()) + " training images")
        lines += ["", f"Propagated labels P on {where} (their dense labels; RAWKS's P, the table's "
                  "rows are its network Q), mean ± std over seeds:", ""]
        head = ["method"] + [n for _, n in PROPAGATION]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m, row in summary["propagation"].items():
            lines.append("| " + " | ".join([m] + [pm(row[k]) for k, _ in PROPAGATION]) + " |")
    if command:
        lines += ["", f"Command: `{command}`"]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _over_seeds(values) -> dict:
    return {"per_seed": [float(v) for v in values], "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")}


DENSECRF_PROPAGATION = "densecrf propagation"  # DenseCRF from RAWKS's scribbles, beside P
DENSECRF = "densecrf"  # the row of DenseCRF on the control; a method's post-processed row is METHOD+densecrf


def densecrf_params(spec: str | None, *, out, control_run):
    """``--densecrf`` -> :class:`experiments.densecrf.DenseCRFParams` or None: ``"deeplab"`` (DeepLab-v2's
    published parameters) or ``"dev"`` (chosen on the dev split by :data:`experiments.densecrf.GRID`
    with the control of the first seed, cached in ``out/densecrf_dev.json``)."""
    if not spec or spec == "none":
        return None
    from experiments import densecrf

    if spec == "deeplab":
        return densecrf.DEEPLAB_V2
    if spec == "dev":
        return tune_densecrf(control_run, densecrf.GRID, split="validation", out=pathlib.Path(out) / "densecrf_dev.json")[0]
    raise ValueError(f"--densecrf: expected none, deeplab or dev, got {spec!r}")


def _crf_row(e: dict) -> dict:
    """A run's DenseCRF-post-processed counts (``crf_*``) as a row of its own."""
    row = {k[len("crf_"):]: v for k, v in e.items() if k.startswith("crf_")}
    row.update(trimap_widths=e["trimap_widths"], num_classes=e["num_classes"])
    if "crf_panel_pred" in e:
        row.update(panel_images=e["panel_images"], panel_labels=e["panel_labels"])
    return row


def run(base, *, steps: int, out, seeds=(0,), methods=DEFAULT_METHODS, config, control: str = CONTROL,
        smoke: bool = False, manual_dir: str | None = None, num_panels: int = 4, num_samples: int = 2000,
        train: bool = True, command: str = "", propagation_images: int = 0, split: str = "validation",
        densecrf: str | None = None) -> dict:
    """Train (unless ``train=False``), evaluate and tabulate; returns the summary dict.

    ``base=None`` trains every run from scratch; ``control`` names the run the others are
    compared with (a method of ``config``); ``propagation_images``: RAWKS's P on the first that
    many training images (:func:`propagation_metrics`; 0 = every one); ``split``: the split the
    table reports (``"validation"``, the dev split, or ``"test"``); ``densecrf``: ``"deeplab"`` or
    ``"dev"`` (:func:`densecrf_params`) adds the ``densecrf`` row (the control post-processed) and a
    ``METHOD+densecrf`` row per method, and the differences to ``densecrf``."""
    from rwseg.train.panels import save_panels

    out = pathlib.Path(out)
    names = [control] + [m for m in methods if m != control]
    for m in names:  # every run has a base (or none): fail before any training
        base_of(base, m, 0)
    evals, times, propagation, inference = ({m: [] for m in names} for _ in range(4))
    missing = []
    crf = None
    for seed in seeds:
        for m in names:
            workdir = out / f"seed{seed}" / m
            cfg = run_config(config, m, base=base_of(base, m, seed), steps=steps, seed=seed, smoke=smoke, manual_dir=manual_dir)
            if train:
                train_run(cfg, workdir)
            if not _finished(workdir, steps):
                missing.append(str(workdir))
                continue
            if densecrf and crf is None:
                crf = densecrf_params(densecrf, out=out, control_run=out / f"seed{seeds[0]}" / control)
            e = evaluate_images(workdir, split=split, num_panels=num_panels, densecrf=crf)
            evals[m].append(e)
            times[m].append(step_seconds(workdir))
            inference[m].append(float(e["seconds"]))
            if crf is not None:
                row = DENSECRF if m == control else f"{m}+{DENSECRF}"
                for d, v in ((evals, _crf_row(e)), (times, times[m][-1]),
                             (inference, float(e["seconds"]) + float(e["crf_seconds"]))):
                    d.setdefault(row, []).append(v)
            if cfg.method == "rawks":
                propagation[m].append(propagation_metrics(workdir, images=propagation_images))
                if crf is not None:  # the classic from the same scribbles, parameters chosen on dev
                    from experiments import densecrf as dc
                    from rwseg.train.workdir import load_config

                    run_cfg = load_config(workdir)
                    prop = tune_densecrf_propagation(run_cfg, dc.GRID, images=propagation_images,
                                                     out=out / f"densecrf_propagation_dev_seed{seed}.json")[0]
                    propagation.setdefault(DENSECRF_PROPAGATION, []).append(
                        densecrf_propagation(run_cfg, run_cfg.data.train_split, prop, images=propagation_images))
    complete = [m for m in evals if len(evals[m]) == len(seeds)]
    if control not in complete:
        raise RuntimeError(f"the control {control!r} has not finished for every seed (missing: {missing})")
    if missing:
        print("not finished (left out of the table): " + ", ".join(missing), flush=True)
    order = [control] + ([DENSECRF] if DENSECRF in complete else []) + [m for m in names if m != control and m in complete]
    order += [m for m in complete if m not in order]
    summary = summarize({m: evals[m] for m in order}, {m: times[m] for m in order}, num_samples=num_samples,
                        control=control, reference=DENSECRF if DENSECRF in complete else None,
                        inference={m: inference[m] for m in order})
    summary["propagation"] = {m: {k: _over_seeds([p[k] for p in propagation[m]]) for k, _ in PROPAGATION}
                              for m in names + [DENSECRF_PROPAGATION]
                              if (m in complete or m == DENSECRF_PROPAGATION) and propagation.get(m)}
    summary["propagation_images"] = {m: int(propagation[m][0]["images"]) for m in names
                                     if m in complete and propagation[m] and propagation_images}
    summary.update(base=base if isinstance(base, dict) or base is None else str(base), steps=int(steps), seed_list=list(seeds),
                   missing=missing, split=split)
    if crf is not None:
        import dataclasses

        summary["densecrf"] = {"choice": densecrf, "params": dataclasses.asdict(crf)}
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if split == "validation" else f"_{split}"
    (out / f"results{suffix}.json").write_text(json.dumps(summary, indent=2))
    (out / f"results{suffix}.md").write_text(markdown(summary, command=command, split=split))
    first = {m: evals[m][0] for m in order}
    if num_panels and "panel_pred" in first[control]:
        columns = {"ground truth": first[control]["panel_labels"], "control": first[control]["panel_pred"]}
        columns.update({m: first[m]["panel_pred"] for m in order if m != control and "panel_pred" in first[m]})
        save_panels(out / f"panels{suffix}.png", first[control]["panel_images"], columns,
                    int(first[control]["num_classes"]), scale=1 if not smoke else 3)
    print((out / f"results{suffix}.md").read_text(), flush=True)
    return summary


DEFAULT_CONFIG = ROOT / "experiments" / "configs" / "stanford_refine.py"


def main(argv=None, *, default_config=DEFAULT_CONFIG) -> int:
    """The command line; ``default_config``: the ``--config`` file when the flag is not given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=None,
                        help="workdir of the trained baseline (init_from of every run), or comma-separated "
                        "METHOD=RUN entries ({seed} = the seed); left out: from scratch")
    parser.add_argument("--steps", type=int, required=True, help="training steps of every run (on top of the base)")
    parser.add_argument("--control", default=CONTROL, help="the method every other is compared with "
                        "(default: %(default)s; e.g. scribble_baseline against rawks)")
    parser.add_argument("--out", required=True, help="output directory (runs, results.md, panels.png)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--config", default=None if default_config is None else str(default_config),
                        required=default_config is None,
                        help="config file taking METHOD[,smoke] (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="the config's few-second smoke variant")
    parser.add_argument("--manual_dir", default=None, help="data folder (default: the base run's data.manual_dir, "
                        "else the config's)")
    parser.add_argument("--panels", type=int, default=4, help="panel rows (validation images; 0 = none)")
    parser.add_argument("--bootstrap_samples", type=int, default=2000)
    parser.add_argument("--no_train", action="store_true", help="evaluate and tabulate the finished runs only")
    parser.add_argument("--propagation_images", type=int, default=0,
                        help="RAWKS: P on the first N training images only (0 = every one, the default)")
    parser.add_argument("--split", default="validation", choices=("validation", "test"),
                        help="the split the table reports: validation (the dev split, every choice is made on it) "
                        "or test (reported only; Stanford Background)")
    parser.add_argument("--densecrf", default="none", choices=("none", "deeplab", "dev"),
                        help="add DenseCRF rows: the control and each method post-processed with DeepLab-v2's "
                        "parameters (deeplab) or with parameters chosen on the dev split (dev)")
    args = parser.parse_args(argv)
    if args.propagation_images < 0:
        parser.error(f"--propagation_images: expected an integer >= 0, got {args.propagation_images}")
    if args.steps < 1:
        parser.error(f"--steps: expected an integer >= 1, got {args.steps}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        base = parse_base(args.base)
        for m in [args.control] + methods:
            base_of(base, m, 0)
    except ValueError as e:
        parser.error(str(e))
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    command = "python experiments/refine_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    run(base, steps=args.steps, out=args.out, seeds=seeds, methods=methods, config=args.config,
        control=args.control, smoke=args.smoke, manual_dir=args.manual_dir, num_panels=args.panels, num_samples=args.bootstrap_samples,
        train=not args.no_train, command=command, propagation_images=args.propagation_images, split=args.split,
        densecrf=args.densecrf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
