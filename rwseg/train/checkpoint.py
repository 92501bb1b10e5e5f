"""Checkpoints with orbax: periodic (``workdir/checkpoints``) and best-by-mIoU (``workdir/best``),
each verified by a checksum on restore.

A checkpoint at step ``s`` holds the train state after ``s`` optimiser steps:
``{"params": ..., "opt_state": ...}`` (and ``"stats"``, the model's constant dataset
statistics, when it has any) as plain pytrees of arrays, in ``<dir>/<s>/default``.

Integrity. Orbax writes into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact (the partial one is cleaned
up on the next start) — but it has no checksum of its own (orbax-checkpoint 0.12.8
verifies nothing on restore), so every save also stores, as a second item of the same
atomic checkpoint (``<dir>/<s>/checksum``), the sha256 of each array's bytes (with its
dtype and shape), computed on the host copy of the state being saved
(:func:`state_digest`). :meth:`Checkpoints.restore` recomputes it on the restored
arrays; a checkpoint whose bytes, files or metadata are damaged (checksum mismatch, or
orbax/TensorStore/JSON failing to read it) is reported by path and the newest intact
checkpoint is used instead (the damaged ones are moved to ``workdir/damaged/``, out of
the way of later saves). When checkpoints exist but none is intact,
:class:`NoIntactCheckpointError` names the workdir: a run never silently starts again
from step 0. Checkpoints written before checksums were recorded are restored with a
warning that they are unverified.
"""

from __future__ import annotations

import hashlib
import pathlib
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpoints", "abstract_like", "read_state", "state_digest", "verify_digest",
           "DamagedCheckpointError", "NoIntactCheckpointError", "CheckpointMismatchError"]

STATE_ITEM = "default"     # orbax's default item name: <step>/default holds the state
CHECKSUM_ITEM = "checksum"  # <step>/checksum/metadata: JSON of state_digest
DIGEST_ALGORITHM = "sha256"


class DamagedCheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match its recorded checksum."""


class NoIntactCheckpointError(RuntimeError):
    """Checkpoints exist but none is intact (the message names the workdir and each damage)."""


class CheckpointMismatchError(ValueError):
    """An intact checkpoint whose arrays do not fit the model of the current config."""


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: an orbax restore target.

    Args:
      tree: a pytree of ``jax.Array`` s.

    Returns:
      The same tree of ``jax.ShapeDtypeStruct`` (shape, dtype, sharding).
    """
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _host(x) -> np.ndarray:
    """The full value of an array as numpy (replicated or multi-process arrays included)."""
    if isinstance(x, jax.Array):
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_shards[0].data)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _path_name(path) -> str:
    """``params/backbone/stem/conv/kernel``-style name of a tree path, the same whether the
    containers are dicts, lists, tuples or namedtuples (orbax's metadata tree may differ in kind)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def state_digest(state) -> dict:
    """``{"algorithm": "sha256", "leaves": {path: hex digest}}`` of a pytree of arrays.

    Each leaf's digest covers its dtype, shape and C-order bytes, so any changed value,
    shape or dtype changes it; the keys (``params/backbone/.../kernel``) name the arrays.

    Args:
      state: a pytree of arrays (replicated or multi-process arrays included).

    Returns:
      The digest dict (JSON-ready).
    """
    leaves = {}
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        a = np.ascontiguousarray(_host(x))
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        leaves[_path_name(path)] = h.hexdigest()
    return {"algorithm": DIGEST_ALGORITHM, "leaves": leaves}


def verify_digest(state, recorded: dict, where) -> None:
    """Raise :class:`DamagedCheckpointError` naming ``where`` unless ``state`` matches ``recorded``.

    Args:
      state: the restored pytree of arrays.
      recorded: the :func:`state_digest` saved with it.
      where: the checkpoint's path, for the message.
    """
    if not isinstance(recorded, dict) or recorded.get("algorithm") != DIGEST_ALGORITHM \
            or not isinstance(recorded.get("leaves"), dict):
        raise DamagedCheckpointError(f"{where}: the recorded checksum is unreadable (got {str(recorded)[:200]!r})")
    actual = state_digest(state)["leaves"]
    expected = recorded["leaves"]
    bad = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DamagedCheckpointError(f"{where}: sha256 of {len(bad)} array(s) differs from the checksum recorded "
                                     f"when it was saved: {shown}")


def _handlers() -> dict:
    return {STATE_ITEM: ocp.StandardCheckpointHandler(), CHECKSUM_ITEM: ocp.JsonCheckpointHandler()}


def _step_records_checksum(manager, step: int) -> bool:
    """Whether the step's orbax metadata says a checksum item was saved (damaged or
    unreadable metadata counts as yes: it is then verified, and fails, like the rest)."""
    try:
        return CHECKSUM_ITEM in (manager.metadata(step).item_handlers or {})
    except Exception:  # noqa: BLE001 - unreadable step metadata is damage, found by the restore
        return True


def _restore_verified(manager, step: int, template, *, verify: bool = True, log=print):
    """Restore ``step`` of ``manager`` into ``template`` (abstract arrays) and check its checksum.

    Raises :class:`DamagedCheckpointError` (message starting with the step directory) for a
    mismatch or a missing checksum item that the step's metadata records; a checkpoint of an
    older rwseg without checksums is restored with a warning through ``log``. ``verify=False``
    restores the arrays only.
    """
    step_dir = pathlib.Path(manager.directory) / str(step)
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_like(template))}
    has_checksum = verify and CHECKSUM_ITEM in manager.item_metadata(step)
    if has_checksum:
        items[CHECKSUM_ITEM] = ocp.args.JsonRestore()
    elif verify and _step_records_checksum(manager, step):
        raise DamagedCheckpointError(f"{step_dir}: its checksum item {step_dir / CHECKSUM_ITEM} is missing")
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    state = restored[STATE_ITEM]
    if has_checksum:
        verify_digest(state, restored[CHECKSUM_ITEM], step_dir)
    elif verify:
        log(f"rwseg.train: WARNING: checkpoint {step_dir} has no checksum (saved by an older "
            "rwseg); restored without verification")
    return state


def _compare_structure(manager, step: int, template) -> None:
    """Raise :class:`CheckpointMismatchError` if the saved arrays' tree, shapes or dtypes are not
    those of ``template`` (a config whose model changed), :class:`DamagedCheckpointError` if the
    array metadata is missing or unreadable."""
    step_dir = pathlib.Path(manager.directory) / str(step)
    meta = manager.item_metadata(step)
    tree = meta.get(STATE_ITEM) if hasattr(meta, "get") else None
    tree = getattr(tree, "tree", tree)
    saved = {_path_name(p): (tuple(m.shape), np.dtype(m.dtype))
             for p, m in jax.tree_util.tree_leaves_with_path(tree) if hasattr(m, "shape")} if tree is not None else {}
    if not saved:
        raise DamagedCheckpointError(f"{step_dir}: the array metadata of {step_dir / STATE_ITEM} is missing or "
                                     "unreadable")
    wanted = {_path_name(p): (tuple(x.shape), np.dtype(x.dtype))
              for p, x in jax.tree_util.tree_leaves_with_path(template)}
    diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if diff:
        lines = [f"{k}: saved {_describe(saved.get(k))}, model {_describe(wanted.get(k))}" for k in diff[:4]]
        more = f"; and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise CheckpointMismatchError(
            f"checkpoint {step_dir} does not fit the model of this config ({len(diff)} arrays differ: "
            + "; ".join(lines) + more + "); the model settings changed since it was saved")


def _describe(entry) -> str:
    return "absent" if entry is None else f"{entry[1].name}{list(entry[0])}"


def _reason(error: Exception, step_dir: pathlib.Path) -> str:
    """One readable line about why ``step_dir`` could not be restored."""
    text = str(error).strip()
    text = text.splitlines()[0] if text else ""
    text = text.split(" See full TensorStore details")[0]  # drop TensorStore's multi-line spec dump
    if isinstance(error, DamagedCheckpointError):
        return text.removeprefix(f"{step_dir}: ")
    return f"{type(error).__name__}: {text[:400]}" if text else type(error).__name__


class Checkpoints:
    """Two orbax CheckpointManagers under one workdir, with checksums.

    Args:
      workdir: run directory.
      keep: periodic checkpoints kept (the newest ones).
      read_only: open existing checkpoints without creating, cleaning or moving anything (evaluation).
      log: where warnings about damaged / unverified checkpoints go (default ``print``).
    """

    def __init__(self, workdir, *, keep: int = 2, read_only: bool = False, log=None):
        self.root = pathlib.Path(workdir).absolute()
        self.read_only = read_only
        self.log = log or (lambda msg: print(msg, flush=True))
        common = dict(create=not read_only, cleanup_tmp_directories=not read_only, read_only=read_only)
        if read_only:  # what orbax would otherwise reset, with a warning each
            common.update(save_interval_steps=0)
        self.latest = ocp.CheckpointManager(
            self.root / "checkpoints", item_handlers=_handlers(),
            options=ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep, **common))
        self.best = ocp.CheckpointManager(
            self.root / "best", item_handlers=_handlers(),
            options=ocp.CheckpointManagerOptions(max_to_keep=None if read_only else 1,
                                                 best_fn=lambda m: float(m["mean_iou"]), best_mode="max", **common))

    def latest_step(self) -> int | None:
        """The newest periodic checkpoint's step.

        Returns:
          The step (int), or ``None`` without any.
        """
        return self.latest.latest_step()

    @staticmethod
    def _args(state):
        return ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                     CHECKSUM_ITEM: ocp.args.JsonSave(state_digest(state))})

    def save(self, step: int, state) -> None:
        """Periodic checkpoint (asynchronous; overwrites nothing). The checksum is computed now,
        on the state being saved, and written into the same atomic checkpoint.

        Args:
          step: the global step.
          state: the train state (a pytree of arrays).
        """
        self.latest.save(step, args=self._args(state), force=True)

    def save_best(self, step: int, state, mean_iou: float) -> None:
        """Offer ``state`` as the best checkpoint; kept only if its mIoU is the highest.

        Args:
          step: the global step.
          state: the train state.
          mean_iou: its evaluation mIoU.
        """
        if self.best.latest_step() == step:
            return
        self.best.save(step, args=self._args(state), metrics={"mean_iou": float(mean_iou)}, force=True)

    def _restore_verified(self, manager, step: int, template):
        _compare_structure(manager, step, template)
        return _restore_verified(manager, step, template, log=self.log)

    def restore(self, template, *, which: str = "latest", step: int | None = None):
        """Restore the newest intact checkpoint into the structure/shardings of ``template``.

        Damaged checkpoints are reported (by path) through ``log`` and skipped; unless
        read-only they are moved to ``workdir/damaged/``. ``which="best"`` falls back to the
        latest checkpoints when the best one is damaged.

        Args:
          template: a pytree of arrays with the structure, shapes and shardings to restore into.
          which: ``"latest"`` (periodic checkpoints) or ``"best"``.
          step: try only this step.

        Returns:
          ``(step, state)``, or ``None`` when there is no checkpoint at all.

        Raises:
          NoIntactCheckpointError: checkpoints exist but none is intact.
          CheckpointMismatchError: the newest readable checkpoint does not fit ``template``.
        """
        manager = {"latest": self.latest, "best": self.best}.get(which)
        if manager is None:
            raise ValueError(f"which: expected 'latest' or 'best', got {which!r}")
        if step is not None:
            steps = [int(step)]
        else:
            steps = sorted(manager.all_steps(), reverse=True)
            best = manager.best_step() if which == "best" else None
            if best is not None:
                steps = [best] + [s for s in steps if s != best]
        damaged = []
        for s in steps:
            step_dir = pathlib.Path(manager.directory) / str(s)
            try:
                state = self._restore_verified(manager, s, template)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint is damage
                reason = _reason(e, step_dir)
                self.log(f"rwseg.train: WARNING: checkpoint {step_dir} is damaged ({reason})")
                damaged.append((s, step_dir, reason))
                continue
            if damaged:
                self.log(f"rwseg.train: falling back to the newest intact checkpoint, {step_dir} (step {s})")
                self._quarantine(manager, [d for _, d, _ in damaged])
            return s, state
        if damaged:
            if which == "best":
                self.log("rwseg.train: no intact best checkpoint; trying the latest checkpoints")
                return self.restore(template, which="latest")
            listing = "; ".join(f"{d}: {r}" for _, d, r in damaged)
            raise NoIntactCheckpointError(
                f"workdir {self.root}: no intact checkpoint under {manager.directory} ({listing}). Not starting "
                f"again from step 0: move the damaged checkpoints away (or use a new workdir) to train from scratch")
        return None

    def _quarantine(self, manager, step_dirs) -> None:
        """Move damaged step directories to ``workdir/damaged/<dir>-<step>`` (process 0) so that
        later saves of the same steps do not collide with them; the manager re-lists its steps."""
        if self.read_only:
            return
        if jax.process_index() == 0:
            target_root = self.root / "damaged"
            target_root.mkdir(exist_ok=True)
            for d in step_dirs:
                target = target_root / f"{d.parent.name}-{d.name}"
                if target.exists():
                    target = target_root / f"{d.parent.name}-{d.name}-{time.strftime('%Y%m%dT%H%M%S')}"
                shutil.move(str(d), str(target))
                self.log(f"rwseg.train: moved the damaged checkpoint {d} to {target}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("rwseg_checkpoint_quarantine")
        manager.reload()

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def read_state(workdir, *, which: str = "latest", step: int | None = None, verify: bool = True) -> tuple[int, dict]:
    """(step, state as numpy arrays) of a saved run, whatever device topology saved it.

    For inspection (tests, notebooks), through orbax's API: the step comes from the
    CheckpointManager (``which="latest"``: the periodic checkpoints; ``"best"``: the best
    one), the array tree, shapes and dtypes from its item metadata, and every array is
    restored onto the first local device and converted to numpy. With ``verify`` (default)
    the arrays are checked against the checkpoint's recorded checksum, as
    :meth:`Checkpoints.restore` does (none recorded: not checked). Nothing is moved or
    cleaned up.

    Args:
      workdir: a run directory.
      which: ``"latest"`` or ``"best"``.
      step: this step instead of the newest.
      verify: check the arrays against the recorded checksum.

    Returns:
      ``(step, state)``, the state a nested dict of numpy arrays.

    Raises:
      FileNotFoundError: no finished checkpoint (``which``) in ``workdir``.
      DamagedCheckpointError: the checkpoint cannot be read or does not match its checksum
        (the message starts with the step directory).
    """
    if which not in ("latest", "best"):
        raise ValueError(f"which: expected 'latest' or 'best', got {which!r}")
    root = pathlib.Path(workdir).absolute() / ("checkpoints" if which == "latest" else "best")
    if not root.is_dir():
        raise FileNotFoundError(f"workdir: no finished checkpoint under {root}")
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        manager = ckpts.latest if which == "latest" else ckpts.best
        if step is None:
            step = manager.best_step() if which == "best" else manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"workdir: no finished checkpoint under {root}")
        step_dir = pathlib.Path(manager.directory) / str(step)
        try:
            meta = manager.item_metadata(step)
            tree = meta.get(STATE_ITEM) if hasattr(meta, "get") else None
            tree = getattr(tree, "tree", tree)
            if tree is None:
                raise DamagedCheckpointError(f"{step_dir}: the array metadata of {step_dir / STATE_ITEM} is "
                                             "missing or unreadable")
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)
            state = jax.tree.map(np.asarray, _restore_verified(manager, step, target, verify=verify))
        except DamagedCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - name the checkpoint whatever orbax/TensorStore/JSON says
            raise DamagedCheckpointError(f"{step_dir}: {_reason(e, step_dir)}") from e
    finally:
        ckpts.close()
    return int(step), state
