"""Start a run from another run's backbone (``config.init_from``), optionally frozen
(``config.freeze_backbone``): the refinement protocol (SPN paper, §5).

``config.init_from`` names a saved run (see :func:`checkpoint_location`):

* ``WORKDIR`` — its latest periodic checkpoint (``WORKDIR/checkpoints/<newest step>``);
* ``WORKDIR/checkpoints/<step>`` or ``WORKDIR/best/<step>`` — that checkpoint;
* ``WORKDIR/best`` — its best-mIoU checkpoint.

Every rwseg model holds its segmentation network as ``self.backbone``
(:class:`rwseg.models.base.Segmenter`) and the baseline *is* that backbone, so the new
run's ``params["backbone"]`` subtree is replaced by the checkpoint's, array for array
(same paths, shapes and dtypes, else :class:`InitFromError` listing the differences).
Everything else — the method's own layers and the whole optimiser state — starts fresh
(seed ``config.seed``; the learning-rate schedule restarts at step 0). Resuming a run
that already has checkpoints of its own ignores ``init_from``.

``config.init_params = "all"`` copies every parameter instead (the backbone and the method's
own layers; the checkpoint must be a run of the same method and model): a second stage of
the same method, e.g. RAWKS's "train P, Q, then Q" (Vernaza & Chandraker, Table 2), which
fine-tunes the segmentation network Q on the propagated labels of a finished RAWKS run with
its boundary network fixed.

``config.freeze_backbone = True`` keeps the backbone parameters fixed (their updates are
zeroed by ``optax.multi_transform``; the optimiser holds no moments for them, and weight
decay does not touch them); gradients are still computed through it.
``config.freeze_method = True`` does the same for every parameter outside the backbone (the
method's own layers; needs ``init_params = "all"``, a frozen random layer being useless).

``config.optimizer.method_lr_mult = m`` multiplies the updates of every parameter outside
the backbone (the method's new layers) by ``m`` — their learning rate (and decoupled
weight decay) is ``m`` times the schedule's, the usual larger rate for freshly
initialised layers on a trained network (:func:`scale_method_updates`).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import optax

from rwseg.train.checkpoint import _path_name, read_state

__all__ = ["InitFromError", "checkpoint_location", "load_params", "init_params", "init_backbone", "freeze_subtrees",
           "freeze_backbone", "scale_method_updates"]

SUBTREE = "backbone"


class InitFromError(ValueError):
    """``config.init_from`` names no usable checkpoint, or its backbone does not fit the model."""


def checkpoint_location(spec: str) -> tuple[pathlib.Path, str, int | None]:
    """Where ``config.init_from`` points (see the module docstring).

    Args:
      spec: ``WORKDIR``, ``WORKDIR/best`` or ``WORKDIR/{checkpoints,best}/STEP``.

    Returns:
      ``(workdir, "latest" | "best", step or None)``.

    Raises:
      InitFromError: a step under something else than ``checkpoints`` or ``best``.
    """
    path = pathlib.Path(spec).expanduser()
    step = None
    if path.name.isdigit() and path.parent.name in ("checkpoints", "best"):
        step, path = int(path.name), path.parent
    if path.name in ("checkpoints", "best") and not (path / "checkpoints").is_dir():
        return path.parent, "latest" if path.name == "checkpoints" else "best", step
    if step is not None:
        raise InitFromError(f"config.init_from: expected WORKDIR, WORKDIR/best or WORKDIR/{{checkpoints,best}}/STEP, "
                            f"got {spec!r}")
    return path, "latest", None


def load_params(spec: str) -> tuple[dict, str]:
    """The parameters of the checkpoint ``config.init_from`` names.

    Args:
      spec: as for :func:`checkpoint_location`.

    Returns:
      ``(params, where)``: the checkpoint's ``params`` tree as numpy arrays, and a
      description of where it came from.

    Raises:
      InitFromError: no run directory, no finished checkpoint, or no ``params/backbone``.
    """
    workdir, which, step = checkpoint_location(spec)
    if not workdir.is_dir():
        raise InitFromError(f"config.init_from: expected a run directory written by `rwseg train`, "
                            f"got {spec!r} (no directory {workdir})")
    try:
        step, state = read_state(workdir, which=which, step=step)
    except FileNotFoundError as e:
        raise InitFromError(f"config.init_from: {e} (from {spec!r})") from e
    params = state.get("params", {}) if isinstance(state, dict) else {}
    if SUBTREE not in params:
        raise InitFromError(f"config.init_from: the checkpoint {workdir}/{which} step {step} has no "
                            f"params/{SUBTREE} subtree (top-level params: {sorted(params)})")
    return params, f"{workdir} ({which} checkpoint, step {step})"


def _leaves(tree) -> dict:
    """{"aspp/0/conv/kernel"-style path: leaf} (lists and dicts with digit keys name alike: orbax
    restores the model's lists as dicts)."""
    return {_path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def init_params(state: dict, spec: str, *, subtrees=(SUBTREE,)) -> tuple[dict, str]:
    """A copy of the train ``state`` with some parameter subtrees from a checkpoint.

    Args:
      state: the train state (``{"params", "opt_state"[, "stats"]}``).
      spec: the checkpoint (``config.init_from``, :func:`checkpoint_location`).
      subtrees: the top-level names under ``params`` to copy (``None``: every one).

    Returns:
      ``(state, where)``: the new state (optimiser state untouched) and the checkpoint's
      description.

    Raises:
      InitFromError: naming every missing, extra or mis-shaped array when the checkpoint's
        subtrees do not have exactly the structure of the model's (e.g. a different
        ``config.model.width`` or ``aspp_rates``, or another method).
    """
    loaded, where = load_params(spec)
    names = sorted(state["params"]) if subtrees is None else list(subtrees)
    mine = {k: state["params"][k] for k in names}
    a, b = _leaves(mine), _leaves({k: loaded[k] for k in names if k in loaded})
    problems = [f"missing in the checkpoint: {k}" for k in sorted(set(a) - set(b))]
    problems += [f"not in the model: {k}" for k in sorted(set(b) - set(a))]
    problems += [f"{k}: model {a[k].shape} {a[k].dtype}, checkpoint {np.shape(b[k])} {np.asarray(b[k]).dtype}"
                 for k in sorted(set(a) & set(b))
                 if tuple(a[k].shape) != tuple(np.shape(b[k])) or a[k].dtype != np.asarray(b[k]).dtype]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        what = "backbone of {} does" if names == [SUBTREE] else "parameters (" + ", ".join(names) + ") of {} do"
        raise InitFromError(f"config.init_from: the {what.format(where)} not fit this config's model "
                            f"(config.model{'' if names == [SUBTREE] else ' and the method'} must equal the base "
                            f"run's): {shown}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(mine)
    new = jax.tree_util.tree_unflatten(treedef, [np.asarray(b[_path_name(p)]) for p, _ in flat])
    return dict(state, params=dict(state["params"], **new)), where


def init_backbone(state: dict, spec: str) -> tuple[dict, str]:
    """:func:`init_params` of the ``backbone`` subtree alone (``config.init_params = "backbone"``).

    Args:
      state: the train state.
      spec: the checkpoint.

    Returns:
      ``(state, where)`` as :func:`init_params`.
    """
    return init_params(state, spec, subtrees=(SUBTREE,))


def freeze_subtrees(tx: optax.GradientTransformation, frozen) -> optax.GradientTransformation:
    """``tx`` for the parameters outside the top-level subtrees for which ``frozen(name)`` is
    true; zero updates (and no optimiser moments) inside them.

    Args:
      tx: the optimiser.
      frozen: ``name -> bool`` over the top-level names of ``params``.

    Returns:
      The ``optax.multi_transform``.
    """
    def labels(params):
        return {k: jax.tree.map(lambda _: "frozen" if frozen(k) else "train", v) for k, v in params.items()}
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def freeze_backbone(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` for every parameter outside ``params["backbone"]``; zero updates inside it.

    Args:
      tx: the optimiser.

    Returns:
      The wrapped optimiser.
    """
    return freeze_subtrees(tx, lambda name: name == SUBTREE)


def _by_subtree(inside: str, outside: str):
    def labels(params):
        return {k: jax.tree.map(lambda _: inside if k == SUBTREE else outside, v) for k, v in params.items()}
    return labels


def scale_method_updates(tx: optax.GradientTransformation, multiplier: float) -> optax.GradientTransformation:
    """``tx``, then its updates outside ``params["backbone"]`` multiplied by ``multiplier``.

    Args:
      tx: the optimiser.
      multiplier: ``config.optimizer.method_lr_mult``.

    Returns:
      The chained optimiser.
    """
    scale = optax.multi_transform({"backbone": optax.identity(), "method": optax.scale(float(multiplier))},
                                  _by_subtree("backbone", "method"))
    return optax.chain(tx, scale)
