"""Training-throughput benchmark (issue 8.6): one training step of every method vs the baseline.

For the baseline and every method (``rwseg/configs/<method>.py``, default
settings, training crops ``--crop`` = 128, global batch ``--batch`` = 8), builds the
real train step of :func:`rwseg.train.state.make_train_step` (forward + backward +
optimizer update, ``jax.jit`` over a 1-device mesh) and reports the median wall time of
one step over ``--repeats`` steps after ``--warmup`` warm-up steps (which absorb the
compilation), the steps per second and the overhead over the baseline (ratio of the
step times, measured in the same process, in interleaved rounds: one step of every
method per round, so a drifting machine speed affects every method alike). The batch is fixed (synthetic images of the
built-in dataset, :func:`rwseg.data.synthetic.synthetic_example`; scribbles for RAWKS
from :func:`rwseg.data.scribbles_from_labels`), so every step does the same work.

Runs on the CPU (1 device) and, when jax sees a GPU, again on the GPU (one column
pair per device). The papers promise a "minor extra cost" over the base network.

Usage: ``python experiments/benchmarks/bench_train.py [--crop 128] [--batch 8] [--repeats 5]
[--methods baseline,rwn,...]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import jax
import numpy as np
from jax.sharding import Mesh

sys.path.insert(0, os.path.dirname(__file__))
from common import block, gpu_device, machine, markdown_table, median_times  # noqa: E402

from rwseg import data  # noqa: E402
from rwseg.data.synthetic import NUM_CLASSES, synthetic_example  # noqa: E402
from rwseg.models import dataset_statistics  # noqa: E402
from rwseg.data import scribbles_from_labels  # noqa: E402
from rwseg.train import parallel  # noqa: E402
from rwseg.train.config_files import load_config_file  # noqa: E402
from rwseg.train.state import create, make_train_step  # noqa: E402

METHODS = ("baseline", "spn", "rwn", "gcrf", "dilated", "rawks")


def method_config(method: str, crop: int, batch: int):
    config = load_config_file(method)
    config.data.crop_size = crop
    config.batch_size = batch
    return config


def make_batch(config, crop: int, batch: int) -> dict:
    """A fixed training batch: normalised synthetic images, labels (and scribbles)."""
    examples = [synthetic_example(int(config.seed), "train", i, (crop, crop)) for i in range(batch)]
    out = {"image": np.stack([data.normalize(e["image"]) for e in examples]).astype(np.float32),
           "label": np.stack([e["label"] for e in examples]).astype(np.int32)}
    if config.data.scribbles:
        keys = jax.random.split(jax.random.key(int(config.seed)), batch)
        out["scribbles"] = np.stack([scribbles_from_labels(l, k) for l, k in zip(out["label"], keys)])
    return out


def make_runner(method: str, device, *, crop: int, batch: int):
    """A no-argument function running one jitted training step of ``method`` on ``device``
    (blocking until it is done; each call feeds the previous call's state)."""
    config = method_config(method, crop, batch)
    host = make_batch(config, crop, batch)
    with jax.default_device(device):
        setup = create(config, NUM_CLASSES, dataset_statistics(config, host["label"]))
    mesh = Mesh(np.asarray([device]), ("data",))
    step_fn = make_train_step(setup, mesh)
    # placed exactly as the step's in/out shardings, so no call recompiles or reshards
    state = jax.device_put(setup.state, parallel.replicated(mesh))
    batch_arrays = jax.device_put({k: np.asarray(v) for k, v in host.items()}, parallel.batch_sharding(mesh))
    step = jax.device_put(np.asarray(0, np.int32), parallel.replicated(mesh))
    holder = {"state": state}

    def run():
        # the step donates its state: feed each step the previous one's output
        holder["state"], metrics = step_fn(holder["state"], batch_arrays, step)
        block(metrics)

    return run


def step_times(methods, device, *, crop: int, batch: int, repeats: int, warmup: int) -> dict:
    """Median seconds of one training step per method, timed in interleaved rounds.

    Every method is compiled and warmed up first; then each round times one step of
    every method in turn, so a slow drift of the shared machine's speed affects all
    methods alike and the ratios to the baseline stay meaningful.
    """
    runners = {}
    for method in methods:
        runners[method] = make_runner(method, device, crop=crop, batch=batch)
        for _ in range(warmup):
            runners[method]()
        print(f"# {method}: compiled and warmed up", file=sys.stderr, flush=True)
    times = median_times([runners[m] for m in methods], repeats=repeats, warmup=0)
    return dict(zip(methods, times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if "baseline" not in methods:
        methods = ["baseline"] + methods
    devices = [("CPU", jax.devices("cpu")[0])]
    gpu = gpu_device()
    if gpu is not None:
        devices.append(("GPU", gpu))

    times = {}
    for label, device in devices:
        measured = step_times(methods, device, crop=args.crop, batch=args.batch, repeats=args.repeats,
                              warmup=args.warmup)
        times.update({(label, m): t for m, t in measured.items()})

    headers = ["method"]
    for label, _ in devices:
        headers += [f"{label} ms/step", f"{label} steps/s", f"{label} x baseline"]
    rows = []
    for method in methods:
        row = [method]
        for label, _ in devices:
            t, base = times[label, method], times[label, "baseline"]
            row += [f"{t * 1e3:.1f}", f"{1 / t:.2f}", f"{t / base:.2f}"]
        rows.append(row)
    print(f"Training step (forward + backward + optimizer), {args.crop}x{args.crop}, batch {args.batch}, "
          f"median of {args.repeats} steps (interleaved rounds over the methods) after {args.warmup} warm-up steps")
    print(f"machine: {machine()}; gpu: {gpu if gpu is not None else 'none'}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print()
    print(markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
