"""What a weakly supervised network learns from: its predictions Q and, for RAWKS, the
propagated targets P, on the same training images (issue 12, item 3: RAWKS's Q loses about
6 boundary F against the scribble-only network; are P's boundaries the cause?).

    PYTHONPATH=. python experiments/diagnostics/targets_vs_network.py RUN [RUN ...] [--images 64] [--crops 8]

For each run (latest checkpoint; any method) and the first ``--images`` training images, prints
one JSON line with Q's mIoU, pixel accuracy and boundary precision / recall / F against the
images' dense labels (which a scribble-supervised run never saw; :func:`rwseg.train.evaluate.
evaluate` with ``propagation=False``) and, for a RAWKS run, the same for P's argmax
(:func:`rwseg.train.evaluate.evaluate_propagation`, which also gives the abstention rate and the
non-converged solves). All in %, at ``config.boundary_tolerance``.

``--crops N`` adds ``"crops"``: the same for Q and P on the first N training batches exactly as the
trainer draws them (``config.seed``, ``config.data.crop_size`` crops, the config's augmentation
and scribbles): P there is the target Q was trained on, which can be worse than P on whole
images (a crop holds fewer scribbles; a region whose scribble fell outside it takes another label).

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
from rwseg.train.state import source_kwargs, training_batches  # noqa: E402

KEYS = ("mean_iou", "pixel_accuracy", "boundary_precision", "boundary_recall", "boundary_fscore")


def _q_and_p(config, setup, state, mesh, source, batches=None) -> dict:
    """{"Q": ..., "P": ...} (P for a RAWKS run) in %, on ``batches()`` or the first images of ``source``."""
    kw = {} if batches is None else {"batches": batches()}
    q, _ = evaluate(config, setup.graphdef, state, mesh, source, num_classes=setup.num_classes, propagation=False, **kw)
    out = {"Q": {k: round(100 * q[k], 1) for k in KEYS}}
    if config.method == "rawks":
        kw = {} if batches is None else {"batches": batches()}
        p = evaluate_propagation(config, setup.graphdef, state, mesh, source, num_classes=setup.num_classes, **kw)
        out["P"] = {k.removeprefix("train_P_"): round(100 * v, 1) for k, v in p.items()}
    return out


def targets_vs_network(workdir, num_images: int, mesh, num_crop_batches: int = 0) -> dict:
    """The JSON line of one run (module docstring)."""
    config, setup, state, step = load_run(workdir, mesh, checkpoint="latest")
    config.eval_batches, config.eval_batch_size = 1, int(num_images)
    source = data.load_source(config.data.name, config.data.train_split, **source_kwargs(config))
    out = {"run": str(workdir), "method": config.method, "step": int(step),
           "images": min(int(num_images), len(source)), **_q_and_p(config, setup, state, mesh, source)}
    if num_crop_batches:
        crops = _q_and_p(config, setup, state, mesh, source,
                         lambda: training_batches(config, source, mesh, num_steps=num_crop_batches))
        out["crops"] = {"batches": int(num_crop_batches), "crop_size": int(config.data.crop_size), **crops}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--images", type=int, default=64, help="training images (first of the split)")
    parser.add_argument("--crops", type=int, default=0,
                        help="also score Q and P on this many training batches as trained on (0: off)")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images: expected an integer >= 1, got {args.images}")
    if args.crops < 0:
        parser.error(f"--crops: expected an integer >= 0, got {args.crops}")
    mesh = parallel.make_mesh()
    for workdir in args.runs:
        print(json.dumps(targets_vs_network(workdir, args.images, mesh, args.crops)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
