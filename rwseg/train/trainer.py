"""The training loop: ``train_and_evaluate(config, workdir)``.

1. Data: ``rwseg.data.load_source`` + ``make_batches(start_step=...)`` — batch ``s`` is a
   pure function of ``(config.seed, s)``, each process reads its own shard and the
   shards are assembled into one global array sharded over the ``"data"`` mesh axis.
2. Model/optimiser from the config (:mod:`rwseg.train.state`); the state is replicated.
3. Resume: if ``workdir/checkpoints`` holds a checkpoint, training continues from its
   step with the restored parameters and optimiser state; since the data stream and the
   step are deterministic, the final parameters equal those of an uninterrupted run.
4. Logging: JSON lines in ``workdir/metrics.jsonl`` (``{"step", "split", ...}``), a tqdm
   bar with steps/s and ETA, TensorBoard summaries when ``tensorboardX`` is importable.
5. Checkpoints every ``config.checkpoint_every`` steps and at the end; validation every
   ``config.eval_every`` steps (and at the end) keeps the best-mIoU checkpoint and writes
   ``workdir/eval/`` (metrics table, ``panels.png`` and the arrays behind it in
   ``panels.npz``: images, labels, pred).
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np

from rwseg import data
from rwseg.train import parallel
from rwseg.train.checkpoint import Checkpoints
from rwseg.train.evaluate import evaluate, write_results
from rwseg.train.panels import save_panels
from rwseg.train.state import compute_statistics, create, make_train_step, source_kwargs

__all__ = ["train_and_evaluate", "MetricsWriter"]


class MetricsWriter:
    """Appends JSON lines to ``workdir/metrics.jsonl`` (process 0 only), mirrored to
    TensorBoard when ``tensorboardX`` is installed. On resume, lines of steps after the
    restored step (written by the interrupted run) are dropped first."""

    def __init__(self, workdir, *, resume_step: int = 0):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.active = jax.process_index() == 0
        self.tb = None
        if not self.active:
            return
        if self.path.exists():
            keep = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        try:  # optional
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.active:
            return
        scalars = {k: float(v) for k, v in values.items() if np.ndim(v) == 0}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)
            self.tb.flush()


def _progress(config, start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc=config.method,
                disable=not config.progress or jax.process_index() != 0)


def train_and_evaluate(config, workdir) -> dict:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints) and evaluate.

    Returns the final evaluation metrics (``{}`` when ``config.eval_at_end`` is False).
    """
    from rwseg.models import model_class

    model_class(config.method)  # a clear error before any data is built
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh()
    num_steps = int(config.num_steps)
    local_bs = parallel.local_batch_size(int(config.batch_size), mesh)
    info = data.dataset_info(config.data.name)
    kw = source_kwargs(config)
    train_source = data.load_source(config.data.name, config.data.train_split, **kw)
    setup = create(config, info.num_classes, compute_statistics(config, train_source))
    state = parallel.replicate(setup.state, mesh)

    ckpts = Checkpoints(workdir, keep=int(config.keep_checkpoints))
    restored = ckpts.restore(state)
    start = 0
    if restored is not None:
        start, state = restored
        print(f"rwseg.train: resumed from step {start} in {workdir / 'checkpoints'}", flush=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json(indent=2))
    writer = MetricsWriter(workdir, resume_step=start)
    train_step = make_train_step(setup, mesh)

    eval_source = None

    def run_eval(step):
        nonlocal eval_source
        if eval_source is None:
            eval_source = data.load_source(config.data.name, config.data.eval_split, **kw)
        result, panels = evaluate(config, setup.graphdef, state, mesh, eval_source,
                                  num_classes=info.num_classes, num_panels=int(config.num_panels))
        writer.write(step, "eval", {k: v for k, v in result.items() if not isinstance(v, list)})
        ckpts.save_best(step, state, result["mean_iou"])
        return result, panels

    batches = data.make_batches(train_source, batch_size=local_bs, crop_size=int(config.data.crop_size), train=True,
                                seed=int(config.seed), start_step=start, num_steps=max(num_steps - start, 0),
                                scribbles=bool(config.data.scribbles), shard_index=jax.process_index(),
                                shard_count=jax.process_count())
    keys = ("image", "label", "scribbles") if config.data.scribbles else ("image", "label")
    bar = _progress(config, start, num_steps)
    t0, last_logged = time.perf_counter(), start
    result = {}
    for step in range(start, num_steps):
        batch = next(batches)
        batch = parallel.global_batch({k: batch[k] for k in keys}, mesh)
        state, metrics = train_step(state, batch, np.int32(step))
        done = step + 1
        bar.update(1)
        if done % int(config.log_every) == 0 or done == num_steps:
            values = jax.tree.map(float, parallel.to_host(metrics))
            now = time.perf_counter()
            values["steps_per_sec"] = (done - last_logged) / max(now - t0, 1e-9)
            t0, last_logged = now, done
            writer.write(done, "train", values)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            if not np.isfinite(values["loss"]):
                raise FloatingPointError(f"loss is {values['loss']} at step {done}; see {writer.path}")
        if done % int(config.checkpoint_every) == 0 or done == num_steps:
            ckpts.save(done, state)
        if int(config.eval_every) and done % int(config.eval_every) == 0 and done != num_steps:
            run_eval(done)
    bar.close()
    if config.eval_at_end:
        final = ckpts.latest_step() or num_steps
        result, panels = run_eval(final)
        result["step"] = int(final)
        if jax.process_index() == 0:
            out = write_results(workdir, config.method, result, config.trimap_widths)
            if panels:
                np.savez_compressed(out / "panels.npz", **panels)
                save_panels(out / "panels.png", panels["images"],
                            {"ground truth": panels["labels"], config.method: panels["pred"]}, info.num_classes)
    ckpts.wait()
    ckpts.close()
    return result
