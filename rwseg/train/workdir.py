"""The bookkeeping of a run directory: the config each (re)start ran with, and the metrics log.

* ``workdir/config.json``: the config of the first start (never rewritten);
* ``workdir/config_history.jsonl``: one line per (re)start, ``{"step", "time", "changes",
  "config"}`` (:func:`record_config`); the last line is the config a saved run is
  evaluated with (:func:`load_config`);
* ``workdir/metrics.jsonl``: one JSON line per logged step, ``{"step", "split", ...}``
  (:class:`MetricsWriter`), mirrored to TensorBoard when ``tensorboardX`` is importable.

A config read back from a workdir may have been written by an older rwseg: it is upgraded
to the current keys once, here (:func:`previous_config`), by
:func:`rwseg.train.config_upgrade.upgrade_config`.
"""

from __future__ import annotations

import datetime
import json
import pathlib

import jax
import ml_collections
import numpy as np

from rwseg.train.config_check import ConfigError, config_changes, flatten
from rwseg.train.config_upgrade import upgrade_config

__all__ = ["HISTORY", "MetricsWriter", "previous_config", "check_resume_config", "record_config", "load_config"]

HISTORY = "config_history.jsonl"


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
        """Args:
          step: the global step.
          split: ``"train"`` or ``"eval"``.
          values: ``{name: value}``; the scalars are written.
        """
        if not self.active:
            return
        scalars = {k: float(v) for k, v in values.items() if np.ndim(v) == 0}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)
            self.tb.flush()


def previous_config(workdir) -> tuple[dict, pathlib.Path] | None:
    """The config of the latest (re)start recorded in ``workdir``, upgraded to the current keys.

    Args:
      workdir: a run directory.

    Returns:
      ``(config dict, file it came from)``: the last line of ``config_history.jsonl``, else
      ``config.json``, through :func:`rwseg.train.config_upgrade.upgrade_config`; ``None``
      for a new run.

    Raises:
      ConfigError: the file cannot be read.
    """
    workdir = pathlib.Path(workdir)
    history, first = workdir / HISTORY, workdir / "config.json"
    try:
        if history.exists():
            lines = [l for l in history.read_text().splitlines() if l.strip()]
            if lines:
                return upgrade_config(json.loads(lines[-1])["config"]), history
        if first.exists():
            return upgrade_config(json.loads(first.read_text())), first
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"workdir: cannot read the config this run was started with ({e}); "
                          f"fix or remove {history if history.exists() else first}") from e
    return None


def check_resume_config(config, workdir) -> dict:
    """Refuse to continue a run in ``workdir`` with a changed model/method/data/optimizer setting.

    Args:
      config: the config of this (re)start.
      workdir: the run directory.

    Returns:
      ``{key: (old, new)}`` of every differing key (harmless ones included); ``{}`` for a
      new run.

    Raises:
      ConfigError: naming the keys that may not change (see
        :data:`rwseg.train.config_check.HARMLESS_KEYS`) unless ``config.allow_config_change``.
    """
    found = previous_config(workdir)
    if found is None:
        return {}
    old, source = found
    refused = config_changes(old, config)
    if refused and not bool(config.allow_config_change):
        shown = "; ".join(f"config.{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"workdir {workdir} holds a run started with a different config ({source}); changed: {shown}. "
            "Use a new --workdir, or pass --config.allow_config_change=True to continue this run with "
            "the new settings (recorded in " + HISTORY + ")")
    a, b = flatten(old), flatten(config)
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")}


def record_config(config, workdir, step: int, changes: dict) -> None:
    """Write ``config.json`` if absent (never rewritten) and append this start to the history.

    Args:
      config: the config of this (re)start.
      workdir: the run directory.
      step: the step it starts at.
      changes: :func:`check_resume_config`.
    """
    if jax.process_index() != 0:
        return
    workdir = pathlib.Path(workdir)
    first = workdir / "config.json"
    if not first.exists():
        first.write_text(config.to_json(indent=2))
    entry = {"step": int(step), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "changes": {k: list(v) for k, v in changes.items()}, "config": json.loads(config.to_json())}
    with (workdir / HISTORY).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def load_config(workdir) -> ml_collections.ConfigDict:
    """The config of the latest (re)start of the run in ``workdir``.

    The last entry of ``config_history.jsonl`` (a resume may change evaluation-only
    settings such as ``rwn.layer.alpha``), else ``config.json`` (runs from before the history),
    upgraded to the current keys (:func:`previous_config`).

    Args:
      workdir: a run directory.

    Returns:
      The ``ml_collections.ConfigDict``.

    Raises:
      FileNotFoundError: ``workdir`` holds no config.
    """
    found = previous_config(workdir)
    if found is None:
        path = pathlib.Path(workdir) / "config.json"
        raise FileNotFoundError(f"workdir: expected {path} written by `rwseg train`, not found")
    return ml_collections.ConfigDict(found[0])
