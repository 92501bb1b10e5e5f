"""Evaluation-only sweep of a trained run (issue 12, item 3: choose evaluation-time options on
the validation split without retraining).

    PYTHONPATH=. python experiments/diagnostics/eval_sweep.py RUN "" "rwn.layer.alpha=0.97" \
        "rwn.layer.alpha=0.99,rwn.layer.eval_radius=1"

Each SPEC is a comma-separated list of dotted config overrides (``""`` = the run's own
config). Only evaluation-time options make sense here (``config_check.HARMLESS_KEYS``:
``rwn.layer.alpha``, ``rwn.layer.eval_radius``, ``dilated.layer.lam``/``mu``/``num_steps``, ``gcrf.layer.tol``...):
the model is rebuilt per spec (these options are baked into the module) and the run's
latest checkpoint is evaluated on the whole validation split, every image at its own size.
Prints one JSON line per spec.
"""

import argparse
import ast
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from rwseg import data  # noqa: E402
from rwseg.train import parallel  # noqa: E402
from rwseg.train.checkpoint import Checkpoints  # noqa: E402
from rwseg.train.config_check import HARMLESS_KEYS  # noqa: E402
from rwseg.train.evaluate import evaluate  # noqa: E402
from rwseg.train.workdir import load_config  # noqa: E402
from rwseg.train.state import compute_statistics, create, source_kwargs  # noqa: E402


def parse_spec(spec: str) -> dict:
    """``"a.b=1,c=0.5"`` -> ``{"a.b": 1, "c": 0.5}``; only evaluation-time keys."""
    out = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"spec {spec!r}: expected key=value items separated by commas, got {item!r}")
        if key not in HARMLESS_KEYS:
            raise SystemExit(f"spec {spec!r}: {key!r} is not an evaluation-time option (one of "
                             f"{sorted(k for k in HARMLESS_KEYS if '.' in k)})")
        out[key] = ast.literal_eval(value)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory written by rwseg train")
    parser.add_argument("specs", nargs="+", help='dotted overrides, e.g. "rwn.layer.alpha=0.97"; "" = as trained')
    args = parser.parse_args(argv)
    overrides = [parse_spec(s) for s in args.specs]
    mesh = parallel.make_mesh()
    config = load_config(args.run)
    info = data.dataset_info(config.data.name)
    stats = compute_statistics(config, data.load_source(config.data.name, config.data.train_split,
                                                        **source_kwargs(config)))
    setup = create(config, info.num_classes, stats)
    ckpt = Checkpoints(args.run, read_only=True)
    step, state = ckpt.restore(parallel.replicate(setup.state, mesh), which="latest")
    ckpt.close()
    source = data.load_source(config.data.name, config.data.eval_split, **source_kwargs(config))
    for spec, kv in zip(args.specs, overrides):
        start = time.time()
        c = load_config(args.run)
        c.eval_batches = 0
        c.update_from_flattened_dict(kv)
        res, _ = evaluate(c, create(c, info.num_classes, stats).graphdef, state, mesh, source,
                          num_classes=info.num_classes)
        print(json.dumps({"spec": spec, "step": int(step), "mean_iou": round(100 * res["mean_iou"], 2),
                          "pixel_accuracy": round(100 * res["pixel_accuracy"], 2),
                          "boundary_f": round(100 * res["boundary_fscore"], 2),
                          "trimap_error@2": round(100 * res["trimap_error@2"], 2),
                          "nonconverged": round(res.get("nonconverged_fraction", 0.0), 3),
                          "seconds": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
    main()
