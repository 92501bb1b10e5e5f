"""DenseCRF label propagation of RAWKS's generated scribbles, without a RAWKS run (issue 26,
done-when 2: RAWKS's P is compared with it on the training photos).

    PYTHONPATH=. python experiments/diagnostics/densecrf_propagation.py \
        [--config experiments/configs/stanford_scribbles.py] [--method rawks] [--seed 0] \
        [--manual_dir DIR] [--images N] [--out tuned.json]

The refine benchmark computes the same row (``densecrf propagation``) beside a finished RAWKS
run's P (``refine_benchmark.py --config experiments/configs/stanford_scribbles.py --densecrf
dev``); this script needs no trained run, only the run's config: its ``seed`` and the scribble
generator's settings fix the scribbles (:func:`rwseg.data.scribbles_from_labels`), so the
scribbles here are the ones a RAWKS run of that config and seed trains on.

Prints one JSON line per point of :data:`experiments.densecrf.GRID` on the dev (validation)
split's scribbles (``split: "validation"``), then one line for the chosen point (the highest
mIoU there) on the training split (``split: "train"``, the photos RAWKS's P is reported on):
``train_P_mean_iou``, ``train_P_pixel_accuracy``, ``train_P_boundary_fscore`` (fractions),
``images`` and ``params``. ``--out`` caches the dev grid
(:func:`experiments.refine_benchmark.tune_densecrf_propagation`).
"""

import argparse
import dataclasses
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from experiments import densecrf as dc  # noqa: E402
from experiments.refine_benchmark import densecrf_propagation, run_config, tune_densecrf_propagation  # noqa: E402

SCRIBBLES = pathlib.Path(__file__).resolve().parents[1] / "configs" / "stanford_scribbles.py"


def main(argv=None) -> int:
    """Command line (module docstring).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        0; the JSON lines go to stdout.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(SCRIBBLES), help="config file taking METHOD[,smoke] (default: %(default)s)")
    parser.add_argument("--method", default="rawks", help="the RAWKS method of the config (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed, which fixes its scribbles (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="the config's smoke variant")
    parser.add_argument("--manual_dir", default=None, help="data folder (default: the config's)")
    parser.add_argument("--images", type=int, default=0,
                        help="the first N images of each split, rounded up to an evaluation batch (0 = every one)")
    parser.add_argument("--out", default=None, help="JSON cache of the dev grid (reused when its grid is the same)")
    args = parser.parse_args(argv)
    if args.images < 0:
        parser.error(f"--images: expected an integer >= 0, got {args.images}")
    config = run_config(args.config, args.method, steps=1, seed=args.seed, smoke=args.smoke, manual_dir=args.manual_dir)
    if config.method != "rawks":
        parser.error(f"--method: expected a RAWKS method of {args.config} (its scribbles), got {args.method!r} "
                     f"(method {config.method!r})")
    chosen, table = tune_densecrf_propagation(config, dc.GRID, images=args.images, out=args.out)
    for row in table:
        print(json.dumps(dict(row, split="validation")), flush=True)
    train = densecrf_propagation(config, config.data.train_split, chosen, images=args.images)
    print(json.dumps(dict(train, split="train", params=dataclasses.asdict(chosen))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
