"""Evaluation-only sweep of a trained run (issue 12, item 3: choose evaluation-time options on
the validation split without retraining).

    PYTHONPATH=. python experiments/diagnostics/eval_sweep.py RUN "" "rwn.layer.alpha=0.97" \
        "rwn.layer.alpha=0.99,rwn.layer.eval_radius=1"

Each SPEC is a comma-separated list of dotted config overrides (``""`` = the run's own
config), and of parameter scalings ``scale:PATH[LO:HI]=FACTOR`` (the trained parameter at the
dotted ``PATH`` of ``params``, entries ``LO:HI`` of its last axis, times ``FACTOR``; e.g.
``scale:refinement.theta[0:3]=2``, RWN's colour weights: a sharper kernel of the same shape).
Only evaluation-time options make sense here (``config_check.HARMLESS_KEYS``:
``rwn.layer.alpha``, ``rwn.layer.eval_radius``, ``dilated.layer.lam``/``mu``/``num_steps``,
``gcrf.layer.tol``...):
the model is rebuilt per spec (these options are baked into the module) and the run's
latest checkpoint is evaluated on the whole validation split, every image at its own size.
``--what_if`` also accepts options that change training (e.g. ``rwn.layer.walk_on``): the
trained parameters are then evaluated under an option they were not trained with, a what-if
and not what training with it would give. Prints one JSON line per spec.
"""

import argparse
import ast
import json
import pathlib
import re
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from rwseg import data  # noqa: E402
from rwseg.train import parallel  # noqa: E402
from rwseg.train.checkpoint import Checkpoints  # noqa: E402
from rwseg.train.config_check import HARMLESS_KEYS  # noqa: E402
from rwseg.train.evaluate import evaluate  # noqa: E402
from rwseg.train.workdir import load_config  # noqa: E402
from rwseg.train.state import compute_statistics, create, source_kwargs  # noqa: E402


def split_items(spec: str) -> list:
    """``spec`` split at the commas outside brackets (``"a=(1, 2),b=3"`` -> ``["a=(1, 2)", "b=3"]``).

    Args:
        spec: comma-separated items, each maybe holding bracketed commas.

    Returns:
        The items, stripped (an empty string where two commas or an end leave nothing).
    """
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            items.append(spec[start:i].strip())
            start = i + 1
    return items + [spec[start:].strip()]


SCALE = re.compile(r"scale:([\w.]+)\[(\d*):(\d*)\]$")


def parse_spec(spec: str, *, what_if: bool = False) -> dict:
    """``"a.b=1,c=0.5"`` -> ``{"a.b": 1, "c": 0.5}``; evaluation-time keys only unless
    ``what_if``, and parameter scalings ``"scale:p.q[0:3]=2"`` -> ``{("p.q", 0, 3): 2.0}``."""
    out = {}
    for item in filter(None, split_items(spec)):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"spec {spec!r}: expected key=value items separated by commas, got {item!r}")
        if key.startswith("scale:"):
            m = SCALE.match(key)
            if not m:
                raise SystemExit(f"spec {spec!r}: expected scale:PATH[LO:HI]=FACTOR, got {item!r}")
            out[(m.group(1), int(m.group(2) or 0), int(m.group(3)) if m.group(3) else None)] = float(value)
            continue
        if key not in HARMLESS_KEYS and not what_if:
            raise SystemExit(f"spec {spec!r}: {key!r} is not an evaluation-time option (one of "
                             f"{sorted(k for k in HARMLESS_KEYS if '.' in k)}; --what_if for any option)")
        out[key] = ast.literal_eval(value)
    return out


def scale_params(state: dict, scalings: dict) -> dict:
    """Scale trained parameters for an evaluation-only what-if.

    Args:
        state: a train state ``{"params", ...}`` (as restored from the run's checkpoint).
        scalings: ``{(path, lo, hi): factor}`` from :func:`parse_spec`: the parameter at the
            dotted ``path`` of ``params``, entries ``lo:hi`` of its last axis, times ``factor``.

    Returns:
        A new state whose ``params`` are scaled (``state`` is left as it is); a path that
        names no parameter exits with the parameters available at that level.
    """
    params = jax.tree.map(lambda x: x, state["params"])
    for (path, lo, hi), factor in scalings.items():
        *parents, last = path.split(".")
        node = params
        for part in parents:
            if part not in node:
                raise SystemExit(f"scale:{path}: no parameter {part!r} (have {sorted(node)})")
            node = node[part]
        if last not in node:
            raise SystemExit(f"scale:{path}: no parameter {last!r} (have {sorted(node)})")
        node[last] = node[last].at[..., lo:hi].multiply(factor)
    return {**state, "params": params}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory written by rwseg train")
    parser.add_argument("specs", nargs="+", help='dotted overrides, e.g. "rwn.layer.alpha=0.97"; "" = as trained')
    parser.add_argument("--what_if", action="store_true",
                        help="also options that change training (the trained parameters evaluated under them)")
    args = parser.parse_args(argv)
    overrides = [parse_spec(s, what_if=args.what_if) for s in args.specs]
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
        c.update_from_flattened_dict({k: v for k, v in kv.items() if isinstance(k, str)})
        scaled = scale_params(state, {k: v for k, v in kv.items() if not isinstance(k, str)})
        res, _ = evaluate(c, create(c, info.num_classes, stats).graphdef, scaled, mesh, source,
                          num_classes=info.num_classes)
        print(json.dumps({"spec": spec, "step": int(step), "mean_iou": round(100 * res["mean_iou"], 2),
                          "pixel_accuracy": round(100 * res["pixel_accuracy"], 2),
                          "boundary_f": round(100 * res["boundary_fscore"], 2),
                          "trimap_error@2": round(100 * res["trimap_error@2"], 2),
                          "nonconverged": round(res.get("nonconverged_fraction", 0.0), 3),
                          "seconds": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
    main()
