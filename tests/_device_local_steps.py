"""Subprocess of tests/test_device_local.py: compile and run one train step and one eval
step of some methods' smoke configs on all (fake) devices of this process.

``python tests/_device_local_steps.py OUT.npz METHOD:STEPS [...]`` (STEPS: ``train``,
``eval`` or ``train,eval``) writes, per method and step, the collectives found inside
while loops of the compiled step (as a JSON list), its number of while loops, and its
results: the parameters and metrics after one train step, the eval predictions and
counts. Also ``probe/*``: the same inspection of ``jit(vmap(rwn.random_walk))`` (a
converged walk, batch sharded) with a bare ``vmap`` and with
:func:`rwseg.layers.device_local.map_examples`. Batches are built directly from the
synthetic generator (no dataset build): global batch 8, 32x32.
"""

import json
import pathlib
import sys

import jax
import numpy as np

from rwseg import data
from rwseg.data.synthetic import NUM_CLASSES, synthetic_example
from rwseg.models import dataset_statistics
from rwseg.data import scribbles_from_labels
from rwseg.train import parallel
from rwseg.train.config_files import load_config_file
from rwseg.train.evaluate import make_eval_step
from rwseg.train.state import create, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCH, SIZE = 8, 32


def host_batch(config):
    examples = [synthetic_example(0, "train", i, (SIZE, SIZE)) for i in range(BATCH)]
    out = {"image": np.stack([data.normalize(e["image"]) for e in examples]).astype(np.float32),
           "label": np.stack([e["label"] for e in examples]).astype(np.int32)}
    if config.data.scribbles:
        keys = jax.random.split(jax.random.key(0), BATCH)
        out["scribbles"] = np.stack([scribbles_from_labels(l, k) for l, k in zip(out["label"], keys)])
    return out


def inspect(fn, args, prefix):
    text = fn.lower(*args).compile().as_text()
    return {f"{prefix}/collectives": np.asarray(json.dumps(parallel.collectives_in_loops(text))),
            f"{prefix}/while_loops": np.asarray(parallel.while_loop_count(text))}


def probe(mesh):
    """A vmapped converged walk on a sharded batch, bare and device-local."""
    from rwseg import rwn, stencil
    from rwseg.layers.device_local import batch_axis, map_examples

    offsets = stencil.four_connected()
    walk = lambda w, f: rwn.random_walk(w, f, offsets, alpha=0.9, symmetric=True, tol=1e-5, max_iters=50)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(BATCH, 8, 8, 3)).astype(np.float32)
    theta = -np.ones(3, np.float32)
    w = jax.vmap(lambda x: rwn.affinity(rwn.feature_distances(x, offsets), theta, offsets))(feats)  # symmetric
    f = rng.normal(size=(BATCH, 8, 8, 2)).astype(np.float32)
    shard = parallel.batch_sharding(mesh)
    args = (jax.device_put(np.asarray(w), shard), jax.device_put(f, shard))
    bare = jax.jit(jax.vmap(walk), in_shardings=(shard, shard), out_shardings=shard)

    def local(w, f):
        with batch_axis(mesh):
            return map_examples(walk, w, f)

    local = jax.jit(local, in_shardings=(shard, shard), out_shardings=shard)
    out = {**inspect(bare, args, "probe/vmap"), **inspect(local, args, "probe/map_examples")}
    out["probe/vmap/y"], out["probe/map_examples/y"] = (parallel.to_host(g(*args)) for g in (bare, local))
    return out


def run(method, steps, mesh):
    config = load_config_file(str(ROOT / "rwseg" / "configs" / f"{method}.py"), "smoke")
    config.batch_size = BATCH
    host = host_batch(config)
    setup = create(config, NUM_CLASSES, dataset_statistics(config, host["label"]))
    state = parallel.replicate(setup.state, mesh)
    batch = parallel.global_batch(host, mesh)
    step = parallel.replicate(np.int32(0), mesh)
    train = make_train_step(setup, mesh)
    evaluate = make_eval_step(setup.graphdef, mesh, NUM_CLASSES, config.trimap_widths, config.boundary_tolerance)
    eval_batch = {k: batch[k] for k in ("image", "label")}
    out = {}
    if "eval" in steps:  # before the train step: it donates the state
        out.update(inspect(evaluate, (state, eval_batch), f"{method}/eval"))
        pred, counts = evaluate(state, eval_batch)
        out[f"{method}/eval/pred"] = parallel.to_host(pred)
        for k, v in parallel.to_host(counts).items():
            out[f"{method}/eval/{k}"] = v
    if "train" in steps:
        out.update(inspect(train, (state, batch, step), f"{method}/train"))
        new_state, metrics = train(state, batch, step)
        for path, leaf in jax.tree_util.tree_leaves_with_path(parallel.to_host(new_state["params"])):
            out[f"{method}/train/params{jax.tree_util.keystr(path)}"] = leaf
        for k, v in parallel.to_host(metrics).items():
            out[f"{method}/train/metrics/{k}"] = v
    return out


def main(path, items):
    mesh = parallel.make_mesh()
    result = {"devices": np.asarray(mesh.devices.size), **probe(mesh)}
    for item in items:
        method, steps = item.split(":")
        result.update(run(method, steps.split(","), mesh))
    np.savez(path, **result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
