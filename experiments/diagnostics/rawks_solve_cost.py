"""Why a RAWKS run trains slowly: its boundary scores and the cost of its hitting-probability
solves (issue 12, item 3: ``stanford_scribbles.py:rawks_alpha0`` trained at a quarter of the
speed of ``rawks`` after its first 20 steps).

    PYTHONPATH=. python experiments/diagnostics/rawks_solve_cost.py RUN [RUN ...] [--images 32]

For each RAWKS run (latest checkpoint) and the first ``--images`` training images with their
generated scribbles, prints one JSON line: the boundary scores B of the walk (eq. 5: a step
across a pixel pays ``exp(-B)/4``) as their mean and the fractions at the clamp
``rawks.layer.max_boundary`` (within 1 %) and below 0.1, and the solves (one refined CG solve per
image, :func:`rwseg.rawks.hitting_probabilities`) as the mean and largest CG iteration count
and the fraction that did not reach ``rawks.layer.tol`` within ``rawks.layer.max_iters``.

``--propagation``: also the quality of P on those images (:func:`rwseg.train.evaluate.
evaluate_propagation`: P mIoU, pixel accuracy, abstention) with the run's learned boundaries and
with none (B = 0 everywhere: the boundary network's output layer zeroed and its bias at -30, so
the walk is a plain diffusion from the scribbles), i.e. what the learned boundaries add to P.

A boundary score at the clamp makes the walk's system ill-conditioned (the coupling across
it is ``exp(-max_boundary)`` of an open step), so the CG iteration count, hence the training
step time (forward solve plus one adjoint solve), grows with the fraction of clamped pixels.
"""

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from rwseg import data  # noqa: E402
from rwseg.layers.device_local import batch_axis  # noqa: E402
from rwseg.train import parallel  # noqa: E402
from rwseg.train.evaluate import eval_batches, load_run  # noqa: E402
from rwseg.train.state import merge, source_kwargs  # noqa: E402


def load(workdir, num_images: int, mesh):
    """(config limited to the first ``num_images`` images, Setup, state, step, training source)
    of a RAWKS run's latest checkpoint, loaded once for both of its JSON lines."""
    config, setup, state, step = load_run(workdir, mesh, checkpoint="latest")
    if config.method != "rawks":
        raise ValueError(f"{workdir}: a RAWKS run was expected, got method {config.method!r}")
    config.eval_batches, config.eval_batch_size = 1, int(num_images)
    source = data.load_source(config.data.name, config.data.train_split, **source_kwargs(config))
    return config, setup, state, step, source


def solve_cost(workdir, run, mesh) -> dict:
    """The JSON line of one run (module docstring); ``run``: :func:`load`'s tuple."""
    config, setup, state, step, source = run
    clamp = float(config.rawks.layer.max_boundary)

    def fn(state, batch):
        with batch_axis(mesh):
            model = merge(setup.graphdef, state)
            b = model.boundary(batch["image"])
            _, info = model.refinement(batch["image"], batch["scribbles"], return_info=True)
        return {"boundary_sum": jnp.sum(b), "boundary_pixels": jnp.asarray(b.size),
                "clamped": jnp.sum(b >= 0.99 * clamp), "open": jnp.sum(b < 0.1),
                "iterations": info.iterations, "nonconverged": info.nonconverged, "valid": batch["valid"]}

    step_fn = jax.jit(fn, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                      out_shardings=parallel.replicated(mesh))
    sums = {"boundary_sum": 0.0, "boundary_pixels": 0, "clamped": 0, "open": 0}
    iterations, nonconverged = [], []
    for batch in eval_batches(config, source, mesh, scribbles=True):
        out = parallel.to_host(step_fn(state, parallel.global_batch(
            {k: batch[k] for k in ("image", "scribbles", "valid")}, mesh)))
        for k in sums:
            sums[k] += out[k].item()
        keep = np.asarray(out["valid"], bool)
        iterations += list(np.asarray(out["iterations"])[keep])
        nonconverged += list(np.asarray(out["nonconverged"])[keep])
    pixels = max(sums["boundary_pixels"], 1)
    return {"run": str(workdir), "step": int(step), "temperature": float(config.rawks.layer.temperature), "images": len(iterations),
            "boundary_mean": round(sums["boundary_sum"] / pixels, 3),
            "boundary_clamped_percent": round(100 * sums["clamped"] / pixels, 2),
            "boundary_open_percent": round(100 * sums["open"] / pixels, 2),
            "cg_iterations_mean": round(float(np.mean(iterations)), 1), "cg_iterations_max": int(np.max(iterations)),
            "nonconverged_percent": round(100 * float(np.mean(nonconverged)), 1),
            "max_iters": int(config.rawks.layer.max_iters)}


def without_boundaries(state):
    """``state`` with the boundary network's output layer giving B = softplus(-30) ~ 0 everywhere."""
    def edit(path, x):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if "boundary_out" not in names:
            return x
        return jnp.full_like(x, -30.0) if names[-1] == "bias" else jnp.zeros_like(x)
    return jax.tree_util.tree_map_with_path(edit, state)


def propagation_quality(workdir, run, mesh) -> dict:
    """P's quality on :func:`load`'s images, learned boundaries vs none."""
    from rwseg.train.evaluate import evaluate_propagation

    config, setup, state, step, source = run
    out = {"run": str(workdir), "step": int(step)}
    for name, s in (("learned", state), ("no_boundaries", without_boundaries(state))):
        metrics = evaluate_propagation(config, setup.graphdef, s, mesh, source, num_classes=setup.num_classes)
        out[name] = {k.removeprefix("train_P_"): round(100 * v, 1) for k, v in metrics.items()}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--images", type=int, default=32, help="training images (first of the split)")
    parser.add_argument("--propagation", action="store_true",
                        help="also P's quality with the learned boundaries and with none")
    args = parser.parse_args(argv)
    mesh = parallel.make_mesh()
    for workdir in args.runs:
        run = load(workdir, args.images, mesh)
        print(json.dumps(solve_cost(workdir, run, mesh)), flush=True)
        if args.propagation:
            print(json.dumps(propagation_quality(workdir, run, mesh)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
