"""The training loop: ``train_and_evaluate(config, workdir)``.

0. The whole config (and the workdir) is validated first
   (:func:`rwseg.train.config_check.check_config`): a bad value fails before any data or
   model is built, with a message naming its ``config.`` key.
1. Data: ``rwseg.data.load_source`` + ``make_batches(start_step=...)`` — batch ``s`` is a
   pure function of ``(config.seed, s)``, each process reads its own shard and the
   shards are assembled into one global array sharded over the ``"data"`` mesh axis.
2. Model/optimiser from the config (:mod:`rwseg.train.state`); the state is replicated.
3. Resume: if ``workdir/checkpoints`` holds a checkpoint, training continues from the
   newest intact one (checksums verified; damaged ones are reported and skipped, see
   :mod:`rwseg.train.checkpoint`) with the restored parameters and optimiser state;
   since the data stream and the step are deterministic, the final parameters equal
   those of an uninterrupted run. A new run with ``config.init_from`` starts from that
   run's backbone parameters (:mod:`rwseg.train.init_from`). The config must be the one
   the run was started with (:func:`rwseg.train.config_check.config_changes`; run length,
   frequencies and evaluation settings may change) unless ``config.allow_config_change``.
   ``workdir/config.json`` keeps the first start's config; every (re)start appends
   ``{"step", "time", "changes", "config"}`` to ``workdir/config_history.jsonl``.
4. Logging: JSON lines in ``workdir/metrics.jsonl`` (``{"step", "split", ...}``), a tqdm
   bar with steps/s and ETA, TensorBoard summaries when ``tensorboardX`` is importable.
5. Checkpoints every ``config.checkpoint_every`` steps and at the end; validation every
   ``config.eval_every`` steps (and at the end) keeps the best-mIoU checkpoint and writes
   ``workdir/eval/`` (metrics table, ``panels.png`` and the arrays behind it in
   ``panels.npz``: images, labels, pred).
6. Whatever fails after the checkpoint managers exist (a step, the final evaluation,
   Ctrl-C), pending checkpoint saves are finished and the managers closed before the
   original error propagates: the last checkpoint is complete and a restart resumes from it.
7. Preemption (:mod:`rwseg.train.preemption`): on SIGTERM / SIGINT the step in flight is
   finished and checkpointed, the save waited for, and :class:`~rwseg.train.preemption.Preempted`
   raised (the CLI exits with status 75). Periodic checkpoints are asynchronous; the time
   they block the loop is logged (``checkpoint_blocked_sec`` in the train metrics) and
   summed up at the end of training.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
import time

import jax
import numpy as np

from rwseg import data
from rwseg.train import parallel
from rwseg.train.checkpoint import Checkpoints
from rwseg.train.config_check import check_config
from rwseg.train.evaluate import evaluate, write_results
from rwseg.train.init_from import init_params
from rwseg.train.panels import save_panels
from rwseg.train.preemption import Preempted, SaveClock, StopSignals, stop_requested
from rwseg.train.state import compute_statistics, create, make_train_step, source_kwargs, training_batches
from rwseg.train.workdir import MetricsWriter, check_resume_config, record_config

__all__ = ["train_and_evaluate", "finishing"]


def _progress(config, start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc=config.method,
                disable=not config.progress or jax.process_index() != 0)


def _finish(ckpts) -> None:
    """Wait for pending checkpoint saves, then close the managers (even if waiting failed)."""
    try:
        ckpts.wait()
    finally:
        ckpts.close()


@contextlib.contextmanager
def finishing(ckpts):
    """``with finishing(Checkpoints(...)) as ckpts:`` — on leaving, pending saves are finished and
    the managers closed; if the body raised, that original error propagates (a failure while
    finishing is then only reported on stderr), so the last checkpoint is never lost to it.

    Args:
      ckpts: the :class:`rwseg.train.checkpoint.Checkpoints` of the run.
    """
    try:
        yield ckpts
    except BaseException:
        try:
            _finish(ckpts)
        except Exception as cleanup:  # noqa: BLE001 - reported; the original error matters more
            print(f"rwseg.train: WARNING: finishing the checkpoints after the error below failed too: "
                  f"{type(cleanup).__name__}: {cleanup}", file=sys.stderr, flush=True)
        raise
    _finish(ckpts)


def train_and_evaluate(config, workdir) -> dict:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints) and evaluate.

    Args:
      config: a training config (validated first, :func:`rwseg.train.config_check.check_config`).
      workdir: the run directory (created; module docstring for what it holds).

    Returns:
      The final evaluation metrics (:func:`rwseg.train.evaluate.evaluate`; ``{}`` when
      ``config.eval_at_end`` is False).

    Raises:
      ConfigError: an invalid config or workdir, or a changed config on resume (before
        any data or model is built).
      rwseg.train.checkpoint.NoIntactCheckpointError: the workdir has checkpoints but
        none is intact.
      rwseg.train.checkpoint.CheckpointMismatchError: the checkpoint does not fit the
        model (a model setting changed under ``allow_config_change``).
    """
    check_config(config, workdir=workdir)
    changes = check_resume_config(config, workdir)
    workdir = pathlib.Path(workdir)
    started_before = (workdir / "config.json").exists()
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh()
    num_steps = int(config.num_steps)
    info = data.dataset_info(config.data.name)
    kw = source_kwargs(config)
    train_source = data.load_source(config.data.name, config.data.train_split, **kw)
    setup = create(config, info.num_classes, compute_statistics(config, train_source))
    state = parallel.replicate(setup.state, mesh)

    with finishing(Checkpoints(workdir, keep=int(config.keep_checkpoints))) as ckpts:
        restored = ckpts.restore(state)
        start = 0
        if restored is not None:
            start, state = restored
            print(f"rwseg.train: resumed from step {start} in {workdir / 'checkpoints'}", flush=True)
        elif started_before:
            print(f"rwseg.train: {workdir} holds an earlier start of this run but no finished checkpoint; "
                  "training from step 0", flush=True)
        if restored is None and config.init_from:
            everything = config.init_params == "all"
            initial, where = init_params(setup.state, config.init_from, subtrees=None if everything else ("backbone",))
            state = parallel.replicate(initial, mesh)
            frozen = [n for n, k in (("backbone", "freeze_backbone"), ("method layers", "freeze_method"))
                      if config[k]]
            print(f"rwseg.train: {'every parameter' if everything else 'backbone'} initialised from {where}"
                  + (f" ({' and '.join(frozen)} frozen)" if frozen else ""), flush=True)
        record_config(config, workdir, start, changes)
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

        batches = training_batches(config, train_source, mesh, start_step=start, num_steps=num_steps - start)
        keys = ("image", "label", "scribbles") if config.data.scribbles else ("image", "label")
        # data.train_labels = "scribbles": the scribbles are the only training labels (the
        # scribble-only baseline RAWKS is compared with; unlabelled pixels are -1, ignored)
        scribble_labels = config.data.train_labels == "scribbles"
        bar = _progress(config, start, num_steps)
        t0, last_logged = time.perf_counter(), start
        result = {}
        clock, stop, train_t0 = SaveClock(), StopSignals().install(), t0  # SIGTERM/SIGINT: preemption.py
        try:
            for step in range(start, num_steps):
                batch = next(batches)
                batch = {k: batch["scribbles" if k == "label" and scribble_labels else k] for k in keys}
                batch = parallel.global_batch(batch, mesh)
                state, metrics = train_step(state, batch, np.int32(step))
                done = step + 1
                bar.update(1)
                if done % int(config.log_every) == 0 or done == num_steps:
                    values = jax.tree.map(float, parallel.to_host(metrics))
                    now = time.perf_counter()
                    values["steps_per_sec"] = (done - last_logged) / max(now - t0, 1e-9)
                    values["checkpoint_blocked_sec"] = clock.take()  # included in the steps' time
                    t0, last_logged = now, done
                    writer.write(done, "train", values)
                    bar.set_postfix(loss=f"{values['loss']:.4f}")
                    if not np.isfinite(values["loss"]):
                        raise FloatingPointError(f"loss is {values['loss']} at step {done}; see {writer.path}")
                if done % int(config.checkpoint_every) == 0 or done == num_steps:
                    clock.save(ckpts, done, state)
                if stop_requested(stop):
                    if clock.last_step != done:
                        clock.save(ckpts, done, state)
                    ckpts.wait()
                    raise Preempted(done, stop.received, ckpts.root / "checkpoints" / str(done))
                if int(config.eval_every) and done % int(config.eval_every) == 0 and done != num_steps:
                    run_eval(done)
        finally:
            stop.restore()
            bar.close()
        if jax.process_index() == 0:
            print(clock.summary(time.perf_counter() - train_t0), flush=True)
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
    return result
