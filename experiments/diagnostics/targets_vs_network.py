"""What a weakly supervised network learns from: its predictions Q and, for RAWKS, the
propagated targets P, on the same training images (issue 12, item 3: RAWKS's Q loses about
6 boundary F against the scribble-only network; are P's boundaries the cause?).

    PYTHONPATH=. python experiments/diagnostics/targets_vs_network.py RUN [RUN ...] [--images 64]

For each run (latest checkpoint; any method) and the first ``--images`` training images, prints
one JSON line with Q's mIoU, pixel accuracy and boundary precision / recall / F against the
images' dense labels (which a scribble-supervised run never saw; :func:`rwseg.train.evaluate.
evaluate` with ``propagation=False``) and, for a RAWKS run, the same for P's argmax
(:func:`rwseg.train.evaluate.evaluate_propagation`, which also gives the abstention rate and the
non-converged solves). All in %, at ``config.boundary_tolerance``.

A network trained on P can at best reproduce P's boundaries on its training images: when P's
boundary F there is below the scribble-only network's Q, training on P teaches Q worse
boundaries than the scribbles alone let it find.
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from rwseg import data  # noqa: E402
from rwseg.train import parallel  # noqa: E402
from rwseg.train.evaluate import evaluate, evaluate_propagation, load_run  # noqa: E402
from rwseg.train.state import source_kwargs  # noqa: E402

KEYS = ("mean_iou", "pixel_accuracy", "boundary_precision", "boundary_recall", "boundary_fscore")


def targets_vs_network(workdir, num_images: int, mesh) -> dict:
    """The JSON line of one run (module docstring)."""
    config, setup, state, step = load_run(workdir, mesh, checkpoint="latest")
    config.eval_batches, config.eval_batch_size = 1, int(num_images)
    source = data.load_source(config.data.name, config.data.train_split, **source_kwargs(config))
    q, _ = evaluate(config, setup.graphdef, state, mesh, source, num_classes=setup.num_classes, propagation=False)
    out = {"run": str(workdir), "method": config.method, "step": int(step),
           "images": min(int(num_images), len(source)), "Q": {k: round(100 * q[k], 1) for k in KEYS}}
    if config.method == "rawks":
        p = evaluate_propagation(config, setup.graphdef, state, mesh, source, num_classes=setup.num_classes)
        out["P"] = {k.removeprefix("train_P_"): round(100 * v, 1) for k, v in p.items()}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--images", type=int, default=64, help="training images (first of the split)")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images: expected an integer >= 1, got {args.images}")
    mesh = parallel.make_mesh()
    for workdir in args.runs:
        print(json.dumps(targets_vs_network(workdir, args.images, mesh)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
