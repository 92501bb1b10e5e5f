"""Where do a run's boundary errors come from? (issue 12, item 3: why refinement does not move
boundary F on Stanford Background.)

    PYTHONPATH=. python experiments/diagnostics/boundary_headroom.py RUN [RUN ...] \
        [--tolerances 2,4,8,16] [--oracle_factor 8]

For each run (latest checkpoint, whole validation split, every image at its own size) prints
the boundary precision, recall and F-score (:func:`rwseg.metrics.boundary_counts`) at several
matching tolerances, one JSON line per run. A predicted boundary pixel that is still unmatched
at 8-16 px is not a misplaced boundary that a refinement could move onto the true edge: it
separates two regions of which at least one has the wrong class.

``oracle``: the same figures for the ground truth itself seen through a coarse network's
output, the one-hot labels average-pooled by ``oracle_factor`` (the backbone's stride) and
upsampled back bilinearly (the argmax of that map): the boundary F a *perfect* 1/8-resolution
classifier reaches without refinement, so ``100 - oracle F`` is the part of boundary F that is
localisation, the part the refinement layers address.
"""

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from rwseg import data, metrics  # noqa: E402
from rwseg.layers.grid import avg_pool, pooled_grid, upsample  # noqa: E402
from rwseg.train import parallel  # noqa: E402
from rwseg.train.evaluate import eval_batches, load_run, make_eval_step  # noqa: E402
from rwseg.train.state import source_kwargs  # noqa: E402


def _counts_fn(tolerances):
    return jax.jit(lambda p, l: jnp.stack([metrics.boundary_counts(p, l, tolerance=t) for t in tolerances]))


def _summary(counts, tolerances) -> dict:
    out = {}
    for t, c in zip(tolerances, counts):
        s = {k: round(100 * float(v), 1) for k, v in metrics.summarize_boundary(c).items()}
        out[f"tol{t:g}"] = s
    return out


def coarse_oracle(labels, num_classes: int, factor: int):
    """argmax of the one-hot ``labels`` (B, H, W) average-pooled by ``factor`` and upsampled back."""
    valid = (labels >= 0) & (labels < num_classes)
    onehot = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes) * valid[..., None]
    h, w = labels.shape[1:3]
    hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
    onehot = jnp.pad(onehot, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    coarse = avg_pool(onehot, factor)
    return jnp.argmax(upsample(coarse, (hp, wp), pooled_grid(factor))[:, :h, :w], axis=-1).astype(jnp.int32)


def run(workdirs, tolerances, oracle_factor: int):
    mesh = parallel.make_mesh()
    counts_fn = _counts_fn(tolerances)
    oracle_done = False
    for workdir in workdirs:
        config, setup, state, step = load_run(workdir, mesh, checkpoint="latest")
        config.eval_batches = 0
        source = data.load_source(config.data.name, config.data.eval_split, **source_kwargs(config))
        predict = make_eval_step(setup.graphdef, mesh, setup.num_classes, config.trimap_widths,
                                 config.boundary_tolerance)
        total = np.zeros((len(tolerances), 4), np.int64)
        oracle = np.zeros_like(total)
        for batch in eval_batches(config, source, mesh):
            pred, _ = predict(state, parallel.global_batch({k: batch[k] for k in ("image", "label")}, mesh))
            pred = parallel.to_host(pred)
            rest = parallel.to_host(parallel.global_batch({k: batch[k] for k in ("label", "valid")}, mesh))
            keep = np.flatnonzero(rest["valid"])
            labels = rest["label"][keep]
            total += np.asarray(counts_fn(pred[keep], labels), np.int64)
            if not oracle_done:
                o = coarse_oracle(jnp.asarray(labels), setup.num_classes, oracle_factor)
                oracle += np.asarray(counts_fn(o, labels), np.int64)
        if not oracle_done:
            print(json.dumps({"run": f"oracle: ground truth at 1/{oracle_factor}, upsampled",
                              **_summary(oracle, tolerances)}), flush=True)
            oracle_done = True
        print(json.dumps({"run": str(workdir), "step": int(step), **_summary(total, tolerances)}), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--tolerances", default="2,4,8,16")
    parser.add_argument("--oracle_factor", type=int, default=8)
    args = parser.parse_args(argv)
    tolerances = tuple(float(t) for t in args.tolerances.split(","))
    run(args.runs, tolerances, args.oracle_factor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
