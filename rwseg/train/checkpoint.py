"""Checkpoints with orbax: periodic (``workdir/checkpoints``) and best-by-mIoU (``workdir/best``).

A checkpoint at step ``s`` holds the train state after ``s`` optimiser steps:
``{"params": ..., "opt_state": ...}`` (and ``"stats"``, the model's constant dataset
statistics, when it has any) as plain pytrees of arrays. Orbax writes into a
temporary directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoint intact (the partial one is cleaned up on the next start).
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpoints", "abstract_like", "read_state"]


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: an orbax restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
    """Two orbax CheckpointManagers under one workdir.

    Args:
      workdir: run directory.
      keep: periodic checkpoints kept (the newest ones).
      read_only: open existing checkpoints without creating directories (evaluation).
    """

    def __init__(self, workdir, *, keep: int = 2, read_only: bool = False):
        root = pathlib.Path(workdir).absolute()
        self.latest = ocp.CheckpointManager(
            root / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                                 cleanup_tmp_directories=not read_only, read_only=read_only))
        self.best = ocp.CheckpointManager(
            root / "best",
            options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: float(m["mean_iou"]),
                                                 best_mode="max", create=not read_only,
                                                 cleanup_tmp_directories=not read_only, read_only=read_only))

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, state) -> None:
        """Periodic checkpoint (asynchronous; overwrites nothing)."""
        self.latest.save(step, args=ocp.args.StandardSave(state), force=True)

    def save_best(self, step: int, state, mean_iou: float) -> None:
        """Offer ``state`` as the best checkpoint; kept only if its mIoU is the highest."""
        if self.best.latest_step() == step:
            return
        self.best.save(step, args=ocp.args.StandardSave(state), metrics={"mean_iou": float(mean_iou)}, force=True)

    def restore(self, template, *, which: str = "latest", step: int | None = None):
        """Restore into the structure/shardings of ``template``; ``(step, state)`` or ``None``."""
        manager = {"latest": self.latest, "best": self.best}.get(which)
        if manager is None:
            raise ValueError(f"which: expected 'latest' or 'best', got {which!r}")
        if step is None:
            step = manager.best_step() if which == "best" else manager.latest_step()
        if step is None:
            return None
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract_like(template)))
        return step, state

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def read_state(workdir, *, which: str = "latest", step: int | None = None) -> tuple[int, dict]:
    """(step, state as numpy arrays) of a saved run, whatever device topology saved it.

    For inspection (tests, notebooks): restores every array onto the first local device
    and converts it to numpy. ``which``: ``"latest"`` (periodic) or ``"best"``.
    """
    import numpy as np

    if which not in ("latest", "best"):
        raise ValueError(f"which: expected 'latest' or 'best', got {which!r}")
    root = pathlib.Path(workdir).absolute() / ("checkpoints" if which == "latest" else "best")
    if step is None:
        steps = [int(p.name) for p in root.glob("*") if p.name.isdigit() and (p / "default").is_dir()]
        if not steps:
            raise FileNotFoundError(f"workdir: no finished checkpoint under {root}")
        step = max(steps) if which == "latest" else None
        if step is None:
            manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True))
            step = manager.best_step() or max(steps)
    path = root / str(step) / "default"
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)
    state = checkpointer.restore(path, target)
    return step, jax.tree.map(np.asarray, state)
