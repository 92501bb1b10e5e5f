"""Dilated affinity diagnosis (issue 12, item 3; the paper's upper bound, docs/methods.md §5):
propagation with the run's predicted affinities against propagation with ground-truth
affinities, on the validation split, from the same coarse probabilities.

    PYTHONPATH=. python experiments/diagnostics/dilated_oracle.py RUN [--steps 1,3,10]

``RUN`` is a ``dilated`` run. For every validation image (own size): ``base`` = the model's
coarse probabilities (no propagation); ``predN`` = N propagation steps with the predicted
affinity logits; ``gtN`` = N steps with ground-truth affinities (logit +10 for a same-label
pair, -10 otherwise; pairs with an ignored label or outside the image closed), both with the
run's ``lam`` and ``mu``. Prints mIoU, pixel accuracy, boundary F and trimap error per
variant, then the mean gate ``sigmoid(mu * logit)`` over cross-boundary and same-label pairs:
a gate near 1 on cross-boundary pairs is a leak through which propagation blurs boundaries.
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rwseg import data, metrics  # noqa: E402
from rwseg import stencil as S  # noqa: E402
from rwseg.constants import IGNORE_INDEX  # noqa: E402
from rwseg.dilated import propagate  # noqa: E402
from rwseg.train import parallel  # noqa: E402
from rwseg.train.checkpoint import Checkpoints  # noqa: E402
from rwseg.train.evaluate import eval_batches, summarize_counts  # noqa: E402
from rwseg.train.workdir import load_config  # noqa: E402
from rwseg.train.state import compute_statistics, create, merge, source_kwargs  # noqa: E402

WIDTHS, TOLERANCE, GT_LOGIT = (2.0, 4.0), 2.0, 10.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--steps", default="1,3,10", help="propagation steps to compare")
    args = parser.parse_args(argv)
    steps = tuple(int(s) for s in args.steps.split(","))
    mesh = parallel.make_mesh()
    config = load_config(args.run)
    if config.method != "dilated":
        raise SystemExit(f"{args.run}: expected a dilated run, got method {config.method!r}")
    config.eval_batches = 0
    lam, mu = float(config.dilated.layer.lam), float(config.dilated.layer.mu)
    config.dilated.layer.num_steps = 0  # the model's prediction = its coarse probabilities
    info = data.dataset_info(config.data.name)
    k = info.num_classes
    setup = create(config, k, compute_statistics(config, data.load_source(
        config.data.name, config.data.train_split, **source_kwargs(config))))
    ckpt = Checkpoints(args.run, read_only=True)
    _, state = ckpt.restore(setup.state, which="latest")
    ckpt.close()
    model = merge(setup.graphdef, state)
    rates = model.refinement.rates
    offsets = S.dilated_offsets(rates)

    @jax.jit
    def run(images, labels):
        out = model.backbone(images)
        grid = model.backbone.grid(images.shape[1:3])
        probs, _ = model.predict(images, return_info=True)
        aff = model.refinement.affinity_logits(images, *model._head_inputs(images, out), features_grid=grid)

        def one(p0, a, lab):
            same, valid = S.label_affinity(lab, offsets, ignore_index=IGNORE_INDEX)
            gt = jnp.where(valid & (same > 0), GT_LOGIT, -GT_LOGIT)
            maps = {"base": p0}
            for n in steps:
                maps[f"pred{n}"] = propagate(p0, a, rates, lam=lam, mu=mu, num_steps=n)
                maps[f"gt{n}"] = propagate(p0, gt, rates, lam=lam, mu=mu, num_steps=n)
            gate = jax.nn.sigmoid(mu * a)
            cross, inside = valid & (same == 0), valid & (same > 0)
            gates = jnp.stack([jnp.sum(gate * cross), jnp.sum(cross), jnp.sum(gate * inside), jnp.sum(inside)])
            return {name: jnp.argmax(m, -1) for name, m in maps.items()}, gates

        preds, gates = jax.vmap(one)(probs, aff, labels)
        counts = {name: {"confusion": metrics.confusion_matrix(p, labels, k),
                         "trimap": metrics.trimap_counts(p, labels, widths=WIDTHS),
                         "boundary": metrics.boundary_counts(p, labels, tolerance=TOLERANCE)}
                  for name, p in preds.items()}
        return counts, gates.sum(0)

    source = data.load_source(config.data.name, config.data.eval_split, **source_kwargs(config))
    totals, gates = None, np.zeros(4)
    for batch in eval_batches(config, source, mesh):
        counts, g = run(jnp.asarray(batch["image"]), jnp.asarray(batch["label"]))
        counts = jax.tree.map(lambda x: np.asarray(x, np.int64), counts)
        totals = counts if totals is None else jax.tree.map(np.add, totals, counts)
        gates += np.asarray(g, np.float64)
    for name, c in totals.items():
        r = summarize_counts(c, WIDTHS, TOLERANCE)
        print(json.dumps({"variant": name, "mean_iou": round(100 * r["mean_iou"], 2),
                          "pixel_accuracy": round(100 * r["pixel_accuracy"], 2),
                          "boundary_f": round(100 * r["boundary_fscore"], 2),
                          "trimap_error@2": round(100 * r["trimap_error@2"], 2)}))
    print(json.dumps({"mean_gate_cross_boundary_pairs": round(gates[0] / gates[1], 4),
                      "mean_gate_same_label_pairs": round(gates[2] / gates[3], 4),
                      "cross_boundary_fraction": round(gates[1] / (gates[1] + gates[3]), 4)}))


if __name__ == "__main__":
    main()
