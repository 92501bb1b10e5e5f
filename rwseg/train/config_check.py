"""Validation of a training config before anything is built, and the resume-time config comparison.

:func:`check_config` checks every option the trainer reads (:data:`COMMON_OPTIONS`), the
method's section against its model and layer, and the checks that involve several fields
(GroupNorm channel counts, crop size and resampling factors, batch sizes against the
device count, frozen parts, the workdir); it raises one :class:`ConfigError` listing every
problem, each line naming its ``config.`` key, e.g.::

    config.num_steps: expected an int >= 1, got -3

A method's section is ``config.<method>``: its ``layer`` section holds exactly the
arguments of the method's layer class (``model_class(method).LAYER``, read through
``inspect.signature``) less those the model supplies (``SUPPLIED``, ``STATISTICS``), each checked by its
name (:data:`ARGUMENT_CHECKS`: one vocabulary, so a name means the same in every layer);
the other keys are the model's and the loss's options (:data:`METHOD_OPTIONS`).

:func:`config_changes` compares the config of a run being resumed with the one it was
started with (upgraded, :mod:`rwseg.train.config_upgrade`); :data:`HARMLESS_KEYS` lists
what may change between (re)starts without ``config.allow_config_change=True``.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import pathlib
from typing import Callable

import numpy as np

__all__ = ["ConfigError", "check_config", "check_workdir", "flatten", "config_changes", "HARMLESS_KEYS",
           "COMMON_OPTIONS", "METHOD_OPTIONS", "ARGUMENT_CHECKS", "layer_arguments"]


class ConfigError(ValueError):
    """An invalid or incompatible training configuration (message names the ``config.`` keys)."""


# ----------------------------------------------------------------------------- value predicates
# Each returns None when the value is fine, else the "expected ..." text (private: the
# checks of check_config, named by the config keys they serve).


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _int_at_least(lo: int) -> Callable:
    def check(v):
        return None if _is_int(v) and v >= lo else f"an int >= {lo}"
    return check


def _number(*, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> Callable:
    """A finite number in the given (closed unless ``*_open``) range."""
    left = "-inf" if lo is None else f"{lo:g}"
    right = "inf" if hi is None else f"{hi:g}"
    text = f"a finite number in {'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"

    def check(v):
        if not _is_number(v) or not math.isfinite(v):
            return text
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return text
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return text
        return None
    return check


def _boolean(v):
    return None if isinstance(v, bool) else "True or False"


def _string(v):
    return None if isinstance(v, str) else "a string"


def _one_of(*choices) -> Callable:
    def check(v):
        return None if v in choices else "one of " + ", ".join(repr(c) for c in choices)
    return check


def _int_list(lo: int, *, nonempty: bool = True) -> Callable:
    def check(v):
        ok = isinstance(v, (tuple, list)) and (len(v) > 0 or not nonempty) and all(_is_int(x) and x >= lo for x in v)
        return None if ok else f"a {'non-empty ' if nonempty else ''}tuple of ints >= {lo}"
    return check


def _positive_numbers(v):
    ok = isinstance(v, (tuple, list)) and len(v) > 0 and all(_is_number(x) and math.isfinite(x) and x > 0 for x in v)
    return None if ok else "a non-empty tuple of finite numbers > 0"


def _scale_range(v):
    ok = (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(x) and math.isfinite(x) for x in v)
          and 0 < v[0] <= v[1])
    return None if ok else "(lo, hi) with 0 < lo <= hi ((1, 1) = no scaling)"


def _color_jitter(v):
    ok = isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_number(x) and 0 <= x < 1 for x in v)
    return None if ok else "(brightness, contrast, saturation), each in [0, 1)"


def _spn_guidance_input(v):
    """Distinct comma-separated names of rwseg.models.spn.GUIDANCE_INPUTS."""
    from rwseg.models.spn import GUIDANCE_INPUTS, parse_guidance_input

    try:
        parse_guidance_input(v)
    except ValueError:
        return "distinct comma-separated names from " + ", ".join(repr(n) for n in GUIDANCE_INPUTS) + " (a string)"
    return None


def _dilated_rates(v):
    """ints >= 1 or (r1, r2) pairs of ints >= 1 (rwseg.dilated rates)."""
    def one(r):
        if _is_int(r):
            return r >= 1
        return isinstance(r, (tuple, list)) and len(r) == 2 and all(_is_int(x) and x >= 1 for x in r)
    ok = isinstance(v, (tuple, list)) and len(v) > 0 and all(one(r) for r in v)
    return None if ok else "a non-empty tuple of ints >= 1 or (r1, r2) pairs of ints >= 1"


# ----------------------------------------------------------------------------- the options

COMMON_OPTIONS = {
    "seed": _int_at_least(0),
    "data.name": _string,
    "data.data_dir": _string,
    "data.manual_dir": _string,
    "data.crop_size": _int_at_least(8),
    "data.scribbles": _boolean,
    "data.train_split": _string,
    "data.eval_split": _string,
    "batch_size": _int_at_least(1),
    "num_steps": _int_at_least(1),
    "model.width": _int_at_least(1),
    "model.depth": _int_at_least(0),
    "model.aspp_rates": _int_list(0),
    "model.features": _int_at_least(1),
    "model.norm": _one_of("group", "none"),
    "optimizer.name": _one_of("adamw", "sgd"),
    "optimizer.learning_rate": _number(lo=0, lo_open=True),
    "optimizer.warmup_steps": _int_at_least(0),
    "optimizer.end_factor": _number(lo=0),
    "optimizer.weight_decay": _number(lo=0),
    "optimizer.momentum": _number(lo=0, hi=1, hi_open=True),
    "optimizer.grad_clip_norm": _number(lo=0),
    "log_every": _int_at_least(1),
    "checkpoint_every": _int_at_least(1),
    "keep_checkpoints": _int_at_least(1),
    "eval_every": _int_at_least(0),
    "eval_at_end": _boolean,
    "eval_batch_size": _int_at_least(1),
    "eval_batches": _int_at_least(0),
    "num_panels": _int_at_least(0),
    "trimap_widths": _positive_numbers,
    "boundary_tolerance": _number(lo=0),
    "statistics_batches": _int_at_least(1),
    "progress": _boolean,
    "baseline_workdir": _string,
    "optimizer.max_nonfinite_skips": _int_at_least(0),
    "optimizer.method_lr_mult": _number(lo=0, lo_open=True),
    "allow_config_change": _boolean,
    "data.synthetic.num_train": _int_at_least(1),
    "data.synthetic.num_validation": _int_at_least(1),
    "data.synthetic.image_size": _int_at_least(8),
    "init_from": _string,
    "init_params": _one_of("backbone", "all"),
    "freeze_backbone": _boolean,
    "freeze_method": _boolean,
    "data.scale_range": _scale_range,
    "data.flip": _boolean,
    "data.color_jitter": _color_jitter,
    "data.train_labels": _one_of("dense", "scribbles"),
    "optimizer.schedule": _one_of("cosine", "poly"),
    "optimizer.power": _number(lo=0, lo_open=True),
    # memory levers (rwseg.layers.memory, rwseg.train.state)
    "compute_dtype": _one_of("float32", "bfloat16"),
    "remat": _boolean,
    "microbatches": _int_at_least(1),
    # config.model.backbone / pretrained / resnet (ResNet's constructor arguments, by its
    # signature): rwseg.models.backbones.check_model_config
}

# method -> {option of config.<method> outside its layer section (read by the model or its loss): check}
METHOD_OPTIONS = {
    "baseline": {},
    "rwn": {"affinity_weight": _number(lo=0)},
    "rawks": {"targets": _one_of("soft", "hard")},  # eq. 11, or cross-entropy on argmax P (frozen walk only)
    "spn": {"aux_weight": _number(lo=0), "guidance_input": _spn_guidance_input},
    "gcrf": {"aux_weight": _number(lo=0), "pretrain_steps": _int_at_least(0), "pretrain_weight": _number(lo=0)},
    "dilated": {"use_stem": _boolean, "beta": _number(lo=0), "refined_weight": _number(lo=0)},
}

# the layers' arguments by name (one vocabulary: a name means one thing in every layer); an
# argument not listed is checked against the type of its default
ARGUMENT_CHECKS = {
    "downsample": _int_at_least(1),
    "tol": _number(lo=0, lo_open=True),
    "max_iters": _int_at_least(1),
    "num_steps": _int_at_least(0),
    "radius": _int_at_least(1),
    "train_radius": _int_at_least(1),
    "eval_radius": _int_at_least(1),
    "eval_downsample": _int_at_least(1),
    # the converged walk (1 - alpha)(I - alpha A)^-1 f (eq. 3) exists only for 0 <= alpha < 1
    "alpha": _number(lo=0, hi=1, hi_open=True),
    "temperature": _number(lo=0),
    "max_boundary": _number(lo=0, lo_open=True),
    "margin": _number(lo=0),
    "gamma": _number(lo=0),
    "lam": _number(lo=0),
    "mu": _number(lo=0),
    "embedding_channels": _int_at_least(1),
    "guidance_channels": _int_at_least(1),
    "boundary_channels": _int_at_least(1),
    "num_filters": _int_at_least(0),
    "decoder_width": _int_at_least(0),
    "guidance_depth": _int_at_least(0),
    "boundary_depth": _int_at_least(0),
    "decoder_depth": _int_at_least(0),
    "rates": _dilated_rates,
    "eval_rates": lambda v: None if isinstance(v, (tuple, list)) and not v else _dilated_rates(v),
    "merge": _one_of("max", "mean"),
    "walk_on": _one_of("logits", "probabilities"),
    "colour_sigma_init": _number(lo=0),
    "colour_gate_init": _number(lo=0, lo_open=True, hi=1),
    "implementation": _one_of("auto", "scan", "pallas"),
}


def _typed_like(default) -> Callable:
    """The check of an argument without an entry in :data:`ARGUMENT_CHECKS`: its default's type."""
    if isinstance(default, bool):
        return _boolean
    if isinstance(default, numbers.Integral):
        return _int_at_least(-(2 ** 63))
    if isinstance(default, numbers.Real):
        return _number()
    if isinstance(default, str):
        return _string
    return lambda v: None


def layer_arguments(model_cls) -> dict:
    """The arguments ``config.<method>.layer`` holds for a model class.

    Args:
      model_cls: a :class:`rwseg.models.base.Segmenter` subclass with a ``LAYER``.

    Returns:
      ``{name: default}`` of every parameter of ``model_cls.LAYER`` except ``self``,
      ``num_classes``, ``rngs`` and the model's ``SUPPLIED`` and ``STATISTICS`` ones (a
      required argument's default is ``inspect.Parameter.empty``).
    """
    params = inspect.signature(model_cls.LAYER.__init__).parameters.values()
    return {p.name: p.default for p in params
            if p.name not in {"self", "num_classes", "rngs"} | set(model_cls.SUPPLIED) | model_cls.STATISTICS}


# keys that may differ between the (re)starts of one run without config.allow_config_change:
# run length, logging/checkpoint/eval frequency, evaluation-only settings, data *locations*
# (not contents) and the evaluation-only options of the methods (used by predict() only).
HARMLESS_KEYS = frozenset({
    "num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_at_end",
    "eval_batch_size", "eval_batches", "num_panels", "trimap_widths", "boundary_tolerance", "progress",
    "baseline_workdir", "allow_config_change", "microbatches", "data.data_dir", "data.manual_dir", "data.eval_split",
    "model.pretrained",  # read only when a run starts; a resumed run restores its checkpoint
    "rwn.layer.eval_radius", "rwn.layer.eval_rates", "rwn.layer.alpha", "rwn.layer.tol", "rwn.layer.max_iters",
    "gcrf.layer.tol", "gcrf.layer.max_iters", "gcrf.layer.eval_radius", "gcrf.layer.eval_downsample",
    "dilated.layer.lam", "dilated.layer.mu", "dilated.layer.num_steps",
})

_MISSING = object()


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return node


def _groupnorm_problem(key: str, value: int, multiples=(1,)) -> str | None:
    """``ConvBlock`` normalises with GroupNorm over min(8, C) groups: every channel count
    ``C = value * m`` must be < 8 or a multiple of 8 (else flax refuses the layer)."""
    counts = [value * m for m in multiples]
    if all(c < 8 or c % 8 == 0 for c in counts):
        return None
    what = f"channel counts {key.removeprefix('config.')} x {tuple(multiples)} = {tuple(counts)} each" \
        if len(multiples) > 1 else "a channel count"
    return (f"{key}: expected {what} < 8 or a multiple of 8 (GroupNorm with min(8, C) groups; "
            f"or config.model.norm='none'), got {value}")


def check_workdir(workdir) -> None:
    """Raise :class:`ConfigError` unless ``workdir`` is a directory or can be created as one.

    Args:
      workdir: the run directory.
    """
    path = pathlib.Path(workdir)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "which is an existing file" if p == path else f"whose parent {p} is a file"
                raise ConfigError(f"workdir: expected a directory or a path to create, got {path} {what}")
            return


def _method_problems(config, method: str, model_cls, values: dict, check) -> list[str]:
    """The problems of ``config.<method>`` (module docstring) and its cross-field checks."""
    errors: list[str] = []
    options = METHOD_OPTIONS.get(method, {})
    if model_cls.LAYER is None:
        return errors
    arguments = layer_arguments(model_cls)
    layer_name = model_cls.LAYER.__name__
    section = _get(config, method)
    if section is _MISSING:
        return [f"config.{method}: method {method!r} reads its options from config.{method} "
                f"({', '.join(options)} and layer, the arguments of {layer_name}), which this config does not "
                f"have; start from rwseg/configs/{method}.py"]
    for key in sorted(set(section.keys()) - set(options) - {"layer"}):
        errors.append(f"config.{method}.{key}: expected one of {', '.join(sorted(options))} or layer "
                      f"(the arguments of {layer_name}), got an unknown key")
    m = {name: check(f"{method}.{name}", pred) for name, pred in options.items()}
    layer = _get(config, f"{method}.layer")
    if layer is _MISSING:
        errors.append(f"config.{method}.layer: missing (expected the arguments of {layer_name}: "
                      f"{', '.join(arguments)})")
        return errors
    for key in sorted(set(layer.keys()) - set(arguments)):
        errors.append(f"config.{method}.layer.{key}: expected an argument of {layer_name} ("
                      f"{', '.join(arguments)}), got an unknown key")
    a = {name: check(f"{method}.layer.{name}", ARGUMENT_CHECKS.get(name) or _typed_like(default))
         for name, default in arguments.items()}
    norm = values.get("model.norm")
    for width, depth in (("guidance_channels", "guidance_depth"), ("boundary_channels", "boundary_depth"),
                         ("decoder_width", "decoder_depth")):
        if norm == "group" and a.get(width, _MISSING) not in (_MISSING, 0) and a.get(depth, _MISSING) not in (
                _MISSING, 0):
            problem = _groupnorm_problem(f"config.{method}.layer.{width}", a[width])
            if problem:
                errors.append(problem)
    if a.get("decoder_depth", _MISSING) not in (_MISSING, 0) and a.get("decoder_width", _MISSING) in (_MISSING, 0):
        width = a["decoder_width"]
        errors.append(f"config.{method}.layer.decoder_width: expected >= 1 with decoder_depth = "
                      f"{a['decoder_depth']}, got {width if width is not _MISSING else 'nothing'}")
    if m.get("targets") == "hard" and values.get("freeze_method") is not True:
        errors.append(f"config.{method}.targets: expected 'soft' unless config.freeze_method is True (argmax P "
                      "carries no gradient to the boundary network), got 'hard'")
    factor = a.get("downsample", _MISSING)
    if factor is not _MISSING and factor > 1:
        sizes = {"config.data.crop_size": values.get("data.crop_size", _MISSING)}
        if values.get("data.name") == "synthetic":
            sizes["config.data.synthetic.image_size"] = values.get("data.synthetic.image_size", _MISSING)
        for key, size in sizes.items():
            if size is not _MISSING and size % factor:
                errors.append(f"config.{method}.layer.downsample: expected a divisor of {key} = {size} (maps are "
                              f"average-pooled by it), got {factor}")
    trains_from_scribbles = "scribbles" in inspect.signature(model_cls.LAYER.__call__).parameters
    if trains_from_scribbles and values.get("data.scribbles") is False:
        errors.append(f"config.data.scribbles: expected True for method {method!r} (it trains from "
                      "scribbles), got False")
    return errors


def check_config(config, *, workdir=None, num_devices: int | None = None, num_processes: int | None = None) -> None:
    """Validate a training config (and ``workdir``) before anything is built.

    Args:
      config: the ``ml_collections.ConfigDict`` of rwseg/configs/<method>.py.
      workdir: the run directory (checked to be a directory or creatable), optional.
      num_devices: for the batch-size checks (default: ``jax.device_count()``).
      num_processes: for the batch-size checks (default: ``jax.process_count()``).

    Returns:
      None; a config that passes is valid.

    Raises:
      ConfigError: listing every problem, one line each, naming the key.
    """
    from rwseg.models import METHODS, model_class

    errors: list[str] = []
    if workdir is not None:
        try:
            check_workdir(workdir)
        except ConfigError as e:
            errors.append(str(e))

    def check(key, predicate):
        value = _get(config, key)
        if value is _MISSING:
            errors.append(f"config.{key}: missing (expected {predicate(_MISSING) or 'a value'})")
            return _MISSING
        problem = predicate(value)
        if problem is not None:
            errors.append(f"config.{key}: expected {problem}, got {value!r}")
            return _MISSING
        return value

    method = _get(config, "method")
    if method not in METHODS:
        errors.append(f"config.method: expected one of {sorted(METHODS)}, got "
                      f"{'nothing' if method is _MISSING else repr(method)}")
    values = {key: check(key, pred) for key, pred in COMMON_OPTIONS.items()}

    ok = lambda *keys: all(values.get(k, _MISSING) is not _MISSING for k in keys)  # noqa: E731

    if ok("data.name"):
        from rwseg import data

        try:
            data.dataset_info(values["data.name"])
        except ValueError as e:
            errors.append(f"config.data.{e}")
    if values.get("init_from") not in (_MISSING, None, ""):
        from rwseg.train.init_from import checkpoint_location

        try:
            base = checkpoint_location(values["init_from"])[0]
            if not base.is_dir():
                errors.append(f"config.init_from: expected a run directory written by `rwseg train`, "
                              f"got {values['init_from']!r} (no directory {base})")
        except ValueError as e:
            errors.append(str(e))
    from rwseg.models.backbones import check_model_config

    errors += check_model_config(config)
    if values.get("freeze_backbone") is True and values.get("init_from") in (_MISSING, None, ""):
        errors.append("config.freeze_backbone: expected False without config.init_from (a frozen random "
                      "backbone), got True")
    if values.get("freeze_method") is True and (values.get("init_from") in (_MISSING, None, "")
                                                or values.get("init_params") != "all"):
        errors.append("config.freeze_method: expected False unless config.init_from is set and config.init_params "
                      "is 'all' (frozen random method layers), got True")
    if values.get("freeze_method") is True and values.get("freeze_backbone") is True:
        errors.append("config.freeze_method: expected False with config.freeze_backbone True (nothing would "
                      "train), got True")
    if values.get("data.train_labels") == "scribbles" and values.get("data.scribbles") is False:
        errors.append("config.data.train_labels: expected 'dense' unless config.data.scribbles is True "
                      "(the scribbles are generated only then), got 'scribbles'")
    if ok("data.crop_size") and values["data.crop_size"] % 8:
        errors.append(f"config.data.crop_size: expected a multiple of 8 (the backbone's 1/8 resolution), "
                      f"got {values['data.crop_size']}")

    if num_devices is None or num_processes is None:
        import jax

        num_devices = jax.device_count() if num_devices is None else num_devices
        num_processes = jax.process_count() if num_processes is None else num_processes
    evaluates = values.get("eval_at_end") is not False or values.get("eval_every") not in (0, _MISSING)
    for key in ("batch_size", "eval_batch_size") if evaluates else ("batch_size",):
        if ok(key) and (values[key] % num_devices or values[key] % num_processes):
            errors.append(f"config.{key}: expected a multiple of the device count {num_devices} "
                          f"(and of the process count {num_processes}), got {values[key]}")
    micro = values.get("microbatches", _MISSING)
    if micro not in (_MISSING, 1) and ok("batch_size") and values["batch_size"] % (num_devices * micro):
        errors.append(f"config.microbatches: expected a divisor of the per-device batch (config.batch_size "
                      f"{values['batch_size']} over {num_devices} devices), got {micro}")

    norm = values.get("model.norm")
    if norm == "group" and ok("model.width", "model.features"):
        w, f = values["model.width"], values["model.features"]
        problem = _groupnorm_problem("config.model.width", w, (1, 2, 4))
        if problem:
            errors.append(problem)
        problem = _groupnorm_problem("config.model.features", f)
        if problem:
            errors.append(problem)

    if method in METHODS:
        errors += _method_problems(config, method, model_class(method), values, check)

    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


# ----------------------------------------------------------------------------- resume comparison


def flatten(config) -> dict:
    """{dotted key: JSON value} of a ConfigDict or a (nested) dict (tuples become lists).

    Args:
      config: a ConfigDict or a nested dict.

    Returns:
      ``{dotted key: value}`` of its leaves.
    """
    tree = json.loads(config.to_json()) if hasattr(config, "to_json") else json.loads(json.dumps(config))
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", tree)
    return out


def config_changes(previous, new) -> dict:
    """The changes that need ``config.allow_config_change``.

    Args:
      previous: the config a run was started with (upgraded to the current keys,
        :func:`rwseg.train.config_upgrade.upgrade_config`), a ConfigDict or nested dict.
      new: the config of this (re)start.

    Returns:
      ``{key: (previous value, new value)}`` of the keys that differ and are not in
      :data:`HARMLESS_KEYS` (a key absent on one side shows as ``"<absent>"``).
    """
    a, b = (flatten(c) for c in (previous, new))
    changed = {}
    for key in sorted(set(a) | set(b)):
        if key in HARMLESS_KEYS:
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            changed[key] = (va, vb)
    return changed
