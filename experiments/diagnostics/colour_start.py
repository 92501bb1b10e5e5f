"""The colour start of SPN's and the dilated head's layers, untrained, on a trained run's
predictions (issue 26, item 3, "start from the classic": how much of DenseCRF's gain the colour
kernel carries before any learning, and which width, reach and steps to start a variant from).

    PYTHONPATH=. python experiments/diagnostics/colour_start.py RUN \\
        "dilated:sigma=0.33,bias=0.5,rates=(2, 4, 8, 16),num_steps=10" \\
        "spn:sigma=0.44,gate=0.99,downsample=2"

Each SPEC is ``LAYER:key=value,...``:

- ``spn``: :class:`rwseg.layers.SpatialPropagation` with ``colour_sigma_init=sigma``,
  ``colour_gate_init=gate`` (default 0.99), ``downsample`` (default 2) and ``merge`` (default
  ``"max"``), its guidance network's gates set to 0: the four scans of the run's scores along
  colour-homogeneous paths (the layer's colour-kernel term alone).
- ``dilated``: :class:`rwseg.layers.DilatedAffinity` with ``colour_sigma_init=sigma``,
  ``rates`` (default ``(2, 4, 8)``), ``num_steps`` (10), ``lam`` (6) and ``mu`` (7), its head a
  constant ``bias`` (default 0.5) for every neighbour: the gate
  ``sigmoid(mu (bias - sum_c (I_i - I_k)_c^2 / (2 sigma^2)))`` (the layer's colour term alone).

The scores refined are the run's predictions (a baseline's logits), every image of the run's
evaluation split (the dev split) at its own size; ``spn`` refines the top-left crop whose sides
divide by ``downsample`` and keeps the run's prediction in the rest (at most ``downsample - 1``
rows and columns). Prints one JSON line for the run as is (``"spec": ""``), then one per SPEC:
``mean_iou``, ``pixel_accuracy``, ``boundary_f`` (in %), ``images`` and ``seconds``.
"""

import argparse
import ast
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from experiments.diagnostics.eval_sweep import split_items  # noqa: E402
from experiments.refine_benchmark import image_extent  # noqa: E402
from rwseg import data  # noqa: E402
from rwseg.layers import DilatedAffinity, SpatialPropagation  # noqa: E402
from rwseg.layers.device_local import batch_axis  # noqa: E402
from rwseg.train import parallel  # noqa: E402
from rwseg.train.evaluate import accumulate, eval_batches, load_run, metric_counts, summarize_counts  # noqa: E402
from rwseg.train.state import merge, source_kwargs  # noqa: E402

DEFAULTS = {"spn": {"gate": 0.99, "downsample": 2, "merge": "max"},
            "dilated": {"bias": 0.5, "rates": (2, 4, 8), "num_steps": 10, "lam": 6.0, "mu": 7.0}}


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"dilated:sigma=0.3,rates=(2, 4)"`` -> ``("dilated", {"sigma": 0.3, "rates": (2, 4), ...defaults})``.

    Args:
        spec: ``LAYER:key=value,...`` (module docstring).

    Returns:
        ``(layer, settings)`` with every setting of the layer (the defaults filled in).

    Raises:
        SystemExit: naming the spec, for an unknown layer or key, a missing ``sigma`` or an
            item that is not ``key=value``.
    """
    layer, sep, rest = spec.partition(":")
    if not sep or layer not in DEFAULTS:
        raise SystemExit(f"spec {spec!r}: expected LAYER:key=value,... with LAYER one of {sorted(DEFAULTS)}")
    settings = dict(DEFAULTS[layer])
    for item in filter(None, split_items(rest)):
        key, eq, value = item.partition("=")
        if not eq or key not in {"sigma", *DEFAULTS[layer]}:
            raise SystemExit(f"spec {spec!r}: expected key=value items with keys from "
                             f"{sorted({'sigma', *DEFAULTS[layer]})}, got {item!r}")
        settings[key] = ast.literal_eval(value)
    if not settings.get("sigma", 0) > 0:
        raise SystemExit(f"spec {spec!r}: expected sigma=WIDTH > 0 (the colour kernel's width)")
    return layer, settings


def build_refine(layer: str, settings: dict, num_classes: int):
    """The untrained colour start as a jitted ``refine(scores (h, w, K), image (h, w, 3)) -> (h', w', K)``.

    Args:
        layer: ``"spn"`` or ``"dilated"``.
        settings: as :func:`parse_spec` returns them.
        num_classes: K.

    Returns:
        ``(refine, divisor)``: the refinement of one image and the divisor its sides need
        (``spn``: ``downsample``; the refinement covers the top-left crop of such sides).
    """
    rngs = nnx.Rngs(0)
    if layer == "spn":
        f = int(settings["downsample"])
        mod = SpatialPropagation(num_classes, guidance_channels=4, guidance_depth=1, downsample=f,
                                 merge=settings["merge"], colour_sigma_init=float(settings["sigma"]),
                                 colour_gate_init=float(settings["gate"]), rngs=rngs)
        mod.gates.kernel[...] = jnp.zeros_like(mod.gates.kernel[...])
        mod.gates.bias[...] = jnp.zeros_like(mod.gates.bias[...])
        return jax.jit(lambda s, im: mod(s[None], im[None], colour=im[None])[0]), f
    rates = tuple(settings["rates"])
    mod = DilatedAffinity(num_classes, 1, rates=rates, frequencies=np.full((len(rates), 9), 1 / 9, np.float32),
                          lam=float(settings["lam"]), mu=float(settings["mu"]), num_steps=int(settings["num_steps"]),
                          colour_sigma_init=float(settings["sigma"]), rngs=rngs)
    mod.affinity_head.bias[...] = jnp.full_like(mod.affinity_head.bias[...], float(settings["bias"]))
    return jax.jit(lambda s, im: mod(s[None], im[None], jnp.zeros((1,) + s.shape[:2] + (1,), s.dtype))[0]), 1


def main(argv=None) -> int:
    """Command line (module docstring).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        0; the JSON lines go to stdout.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory written by rwseg train (e.g. the control)")
    parser.add_argument("specs", nargs="+", help='e.g. "dilated:sigma=0.33,rates=(2, 4, 8, 16)"')
    args = parser.parse_args(argv)
    specs = [parse_spec(s) for s in args.specs]
    mesh = parallel.make_mesh()
    config, setup, state, _ = load_run(args.run, mesh, checkpoint="latest")
    config.eval_batches = 0
    source = data.load_source(config.data.name, config.data.eval_split, **source_kwargs(config))
    k = setup.num_classes
    widths, tol = [float(w) for w in config.trimap_widths], float(config.boundary_tolerance)
    refines = [build_refine(layer, settings, k) for layer, settings in specs]

    @jax.jit
    def scores_fn(state, image):
        with batch_axis(mesh):
            return merge(setup.graphdef, state).predict(image)

    counts_fn = jax.jit(lambda p, lab: metric_counts(p, lab, num_classes=k, widths=widths, tolerance=tol))
    totals, seconds, images = [None] * (len(specs) + 1), [0.0] * (len(specs) + 1), 0
    for batch in eval_batches(config, source, mesh, keys=("mask",)):
        scores = parallel.to_host(scores_fn(state, parallel.global_batch({"image": batch["image"]}, mesh)["image"]))
        for i in np.flatnonzero(batch["valid"]):
            h, w = image_extent(batch["mask"][i])
            own, image, labels = scores[i, :h, :w], jnp.asarray(batch["image"][i, :h, :w]), batch["label"][i, :h, :w]
            images += 1
            for j, refine in enumerate([None] + refines):
                start = time.time()
                pred = own.argmax(-1)
                if refine is not None:
                    fn, f = refine
                    hf, wf = h - h % f, w - w % f
                    pred[:hf, :wf] = np.asarray(fn(jnp.asarray(own[:hf, :wf]), image[:hf, :wf])).argmax(-1)
                totals[j] = accumulate(totals[j], counts_fn(jnp.asarray(pred), jnp.asarray(labels)))
                seconds[j] += time.time() - start
    for spec, total, secs in zip([""] + list(args.specs), totals, seconds):
        res = summarize_counts(total, widths, tol)
        print(json.dumps({"spec": spec, "mean_iou": round(100 * float(res["mean_iou"]), 2),
                          "pixel_accuracy": round(100 * float(res["pixel_accuracy"]), 2),
                          "boundary_f": round(100 * float(res["boundary_fscore"]), 2), "images": images,
                          "seconds": round(secs, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
