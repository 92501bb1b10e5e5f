"""Validation of a training config before anything is built, and the resume-time config comparison.

:func:`check_config` checks every option the trainer and the method's model read (the
method section present, ranges such as ``num_steps >= 1`` or ``0 <= rwn.alpha < 1``,
GroupNorm channel counts, crop size and resampling factors, batch sizes against the
device count, the workdir) and raises one :class:`ConfigError` listing every problem,
each line naming its ``config.`` key, e.g.::

    config.num_steps: expected an int >= 1, got -3

:func:`config_changes` compares the config of a run being resumed with the one it was
started with; :data:`HARMLESS_KEYS` lists what may change between (re)starts without
``config.allow_config_change=True``.
"""

from __future__ import annotations

import json
import math
import numbers
import pathlib
from typing import Callable

import numpy as np

__all__ = ["ConfigError", "check_config", "check_workdir", "flatten", "config_changes", "HARMLESS_KEYS",
           "OPTIONAL_DEFAULTS",
           "METHOD_OPTIONS"]


class ConfigError(ValueError):
    """An invalid or incompatible training configuration (message names the ``config.`` keys)."""


# ----------------------------------------------------------------------------- value predicates
# Each returns None when the value is fine, else the "expected ..." text.


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def int_at_least(lo: int) -> Callable:
    def check(v):
        return None if _is_int(v) and v >= lo else f"an int >= {lo}"
    return check


def number(*, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
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


def boolean(v):
    return None if isinstance(v, bool) else "True or False"


def string(v):
    return None if isinstance(v, str) else "a string"


def one_of(*choices) -> Callable:
    def check(v):
        return None if v in choices else "one of " + ", ".join(repr(c) for c in choices)
    return check


def int_list(lo: int, *, nonempty: bool = True) -> Callable:
    def check(v):
        ok = isinstance(v, (tuple, list)) and (len(v) > 0 or not nonempty) and all(_is_int(x) and x >= lo for x in v)
        return None if ok else f"a {'non-empty ' if nonempty else ''}tuple of ints >= {lo}"
    return check


def positive_numbers(v):
    ok = isinstance(v, (tuple, list)) and len(v) > 0 and all(_is_number(x) and math.isfinite(x) and x > 0 for x in v)
    return None if ok else "a non-empty tuple of finite numbers > 0"


def scale_range(v):
    ok = (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(x) and math.isfinite(x) for x in v)
          and 0 < v[0] <= v[1])
    return None if ok else "(lo, hi) with 0 < lo <= hi ((1, 1) = no scaling)"


def color_jitter(v):
    ok = isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_number(x) and 0 <= x < 1 for x in v)
    return None if ok else "(brightness, contrast, saturation), each in [0, 1)"


def spn_guidance_input(v):
    """Distinct comma-separated names of rwseg.models.spn.GUIDANCE_INPUTS."""
    from rwseg.models.spn import GUIDANCE_INPUTS, parse_guidance_input

    try:
        parse_guidance_input(v)
    except ValueError:
        return "distinct comma-separated names from " + ", ".join(repr(n) for n in GUIDANCE_INPUTS) + " (a string)"
    return None


def dilated_rates(v):
    """ints >= 1 or (r1, r2) pairs of ints >= 1 (rwseg.dilated rates)."""
    def one(r):
        if _is_int(r):
            return r >= 1
        return isinstance(r, (tuple, list)) and len(r) == 2 and all(_is_int(x) and x >= 1 for x in r)
    ok = isinstance(v, (tuple, list)) and len(v) > 0 and all(one(r) for r in v)
    return None if ok else "a non-empty tuple of ints >= 1 or (r1, r2) pairs of ints >= 1"


# ----------------------------------------------------------------------------- the options

COMMON_OPTIONS = {
    "seed": int_at_least(0),
    "data.name": string,
    "data.data_dir": string,
    "data.manual_dir": string,
    "data.crop_size": int_at_least(8),
    "data.scribbles": boolean,
    "data.train_split": string,
    "data.eval_split": string,
    "batch_size": int_at_least(1),
    "num_steps": int_at_least(1),
    "model.width": int_at_least(1),
    "model.depth": int_at_least(0),
    "model.aspp_rates": int_list(0),
    "model.features": int_at_least(1),
    "model.norm": one_of("group", "none"),
    "optimizer.name": one_of("adamw", "sgd"),
    "optimizer.learning_rate": number(lo=0, lo_open=True),
    "optimizer.warmup_steps": int_at_least(0),
    "optimizer.end_factor": number(lo=0),
    "optimizer.weight_decay": number(lo=0),
    "optimizer.momentum": number(lo=0, hi=1, hi_open=True),
    "optimizer.grad_clip_norm": number(lo=0),
    "log_every": int_at_least(1),
    "checkpoint_every": int_at_least(1),
    "keep_checkpoints": int_at_least(1),
    "eval_every": int_at_least(0),
    "eval_at_end": boolean,
    "eval_batch_size": int_at_least(1),
    "eval_batches": int_at_least(0),
    "num_panels": int_at_least(0),
    "trimap_widths": positive_numbers,
    "boundary_tolerance": number(lo=0),
    "statistics_batches": int_at_least(1),
    "progress": boolean,
    "baseline_workdir": string,
}

# optional keys (absent in configs written by older versions): checked only when present
OPTIONAL_OPTIONS = {
    "optimizer.max_nonfinite_skips": int_at_least(0),
    "optimizer.method_lr_mult": number(lo=0, lo_open=True),
    "allow_config_change": boolean,
    "data.synthetic.num_train": int_at_least(1),
    "data.synthetic.num_validation": int_at_least(1),
    "data.synthetic.image_size": int_at_least(8),
    "init_from": string,
    "init_params": one_of("backbone", "all"),
    "freeze_backbone": boolean,
    "freeze_method": boolean,
    "data.scale_range": scale_range,
    "data.flip": boolean,
    "data.color_jitter": color_jitter,
    "data.train_labels": one_of("dense", "scribbles"),
    "compute_dtype": one_of("float32", "bfloat16"),
    "remat": boolean,
    "microbatches": int_at_least(1),
}

# the value an absent optional key stands for: a run whose config.json predates the key
# compares equal on resume when the new config has this value
OPTIONAL_DEFAULTS = {
    "optimizer.max_nonfinite_skips": 0,
    "optimizer.method_lr_mult": 1.0,
    "allow_config_change": False,
    "init_from": "",
    "init_params": "backbone",
    "freeze_backbone": False,
    "freeze_method": False,
    "data.scale_range": [0.75, 1.25],
    "data.flip": True,
    "data.color_jitter": [0.0, 0.0, 0.0],
    "data.train_labels": "dense",
    "compute_dtype": "float32",
    "remat": False,
    "microbatches": 1,
    "spn.guidance_input": "image",
    "dilated.decoder_width": 0,
    "dilated.decoder_depth": 0,
    "rawks.targets": "soft",
}

# method -> {option of config.<method>: check}; every option listed is read by the model
METHOD_OPTIONS = {
    "baseline": {},
    "rwn": {
        "walk_downsample": int_at_least(1),
        "train_radius": int_at_least(1),
        "eval_radius": int_at_least(1),
        # the converged walk (1 - alpha)(I - alpha A)^-1 f (eq. 3) exists only for 0 <= alpha < 1
        "alpha": number(lo=0, hi=1, hi_open=True),
        "affinity_weight": number(lo=0),
        "theta_init": number(),
        "tol": number(lo=0, lo_open=True),
        "max_iters": int_at_least(1),
    },
    "rawks": {
        "width": int_at_least(1),
        "depth": int_at_least(0),
        "downsample": int_at_least(1),
        "alpha": number(lo=0),             # uncertainty weight exp(-alpha H(P)) (eq. 11)
        "max_boundary": number(lo=0, lo_open=True),
        "tol": number(lo=0, lo_open=True),
        "max_iters": int_at_least(1),
        "targets": one_of("soft", "hard"),  # eq. 11, or cross-entropy on argmax P (frozen walk only)
    },
    "spn": {
        "width": int_at_least(1),
        "depth": int_at_least(0),
        "downsample": int_at_least(1),
        "aux_weight": number(lo=0),
        "guidance_input": spn_guidance_input,
    },
    "gcrf": {
        "radius": int_at_least(1),
        "crf_downsample": int_at_least(1),
        "features": int_at_least(1),
        "filters": int_at_least(0),
        "num_layers": int_at_least(1),
        "tol": number(lo=0, lo_open=True),
        "max_layers": int_at_least(1),
        "margin": number(lo=0),
        "aux_weight": number(lo=0),
        "pretrain_steps": int_at_least(0),
        "pretrain_weight": number(lo=0),
        "compat_init": number(),
    },
    "dilated": {
        "rates": dilated_rates,
        "use_stem": boolean,
        "decoder_width": int_at_least(0),
        "decoder_depth": int_at_least(0),
        "beta": number(lo=0),
        "gamma": number(lo=0),
        "lam": number(lo=0),
        "mu": number(lo=0),
        "iterations": int_at_least(0),
    },
}

# the resampling factor of each method (the crop and the synthetic image size must be multiples)
DOWNSAMPLE_KEYS = {"rwn": "walk_downsample", "rawks": "downsample", "spn": "downsample", "gcrf": "crf_downsample"}

# keys that may differ between the (re)starts of one run without config.allow_config_change:
# run length, logging/checkpoint/eval frequency, evaluation-only settings, data *locations*
# (not contents) and the evaluation-only options of the methods (used by predict() only).
HARMLESS_KEYS = frozenset({
    "num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_at_end",
    "eval_batch_size", "eval_batches", "num_panels", "trimap_widths", "boundary_tolerance", "progress",
    "baseline_workdir", "allow_config_change", "microbatches", "data.data_dir", "data.manual_dir", "data.eval_split",
    "rwn.eval_radius", "rwn.alpha", "rwn.tol", "rwn.max_iters",
    "gcrf.tol", "gcrf.max_layers",
    "dilated.lam", "dilated.mu", "dilated.iterations",
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
    """Raise :class:`ConfigError` unless ``workdir`` is a directory or can be created as one."""
    path = pathlib.Path(workdir)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "which is an existing file" if p == path else f"whose parent {p} is a file"
                raise ConfigError(f"workdir: expected a directory or a path to create, got {path} {what}")
            return


def check_config(config, *, workdir=None, num_devices: int | None = None, num_processes: int | None = None) -> None:
    """Validate a training config (and ``workdir``) before anything is built.

    Args:
      config: the ``ml_collections.ConfigDict`` of rwseg/configs/<method>.py.
      workdir: the run directory (checked to be a directory or creatable), optional.
      num_devices, num_processes: for the batch-size checks (default: ``jax.device_count()``
        and ``jax.process_count()``).

    Raises :class:`ConfigError` listing every problem, one line each, naming the key.
    """
    from rwseg.models import METHODS

    errors: list[str] = []
    if workdir is not None:
        try:
            check_workdir(workdir)
        except ConfigError as e:
            errors.append(str(e))

    def check(key, predicate, *, optional=False):
        value = _get(config, key)
        if value is _MISSING:
            if not optional:
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
    values.update({key: check(key, pred, optional=True) for key, pred in OPTIONAL_OPTIONS.items()})

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
                errors.append(f"config.init_from: expected a run directory written by `python -m rwseg.train`, "
                              f"got {values['init_from']!r} (no directory {base})")
        except ValueError as e:
            errors.append(str(e))
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

    if method in METHOD_OPTIONS:
        options = METHOD_OPTIONS[method]
        section = _get(config, method)
        if options and section is _MISSING:
            errors.append(f"config.{method}: method {method!r} reads its options from config.{method} "
                          f"({', '.join(options)}), which this config does not have; start from "
                          f"rwseg/configs/{method}.py")
        elif options:
            m = {name: check(f"{method}.{name}", pred, optional=f"{method}.{name}" in OPTIONAL_DEFAULTS)
                 for name, pred in options.items()}
            if norm == "group" and method in ("rawks", "spn") and m["width"] is not _MISSING and m["depth"]:
                problem = _groupnorm_problem(f"config.{method}.width", m["width"])
                if problem:
                    errors.append(problem)
            if norm == "group" and method == "dilated" and m["decoder_depth"] not in (_MISSING, 0) \
                    and m["decoder_width"] not in (_MISSING, 0):
                problem = _groupnorm_problem("config.dilated.decoder_width", m["decoder_width"])
                if problem:
                    errors.append(problem)
            if method == "dilated" and m["decoder_depth"] not in (_MISSING, 0) and m["decoder_width"] in (_MISSING, 0):
                errors.append(f"config.dilated.decoder_width: expected >= 1 with decoder_depth = "
                              f"{m['decoder_depth']}, got {m['decoder_width'] if m['decoder_width'] is not _MISSING else 'nothing'}")
            if method == "rawks" and m["targets"] == "hard" and values.get("freeze_method") is not True:
                errors.append("config.rawks.targets: expected 'soft' unless config.freeze_method is True (argmax P "
                              "carries no gradient to the boundary network), got 'hard'")
            factor = m.get(DOWNSAMPLE_KEYS.get(method, ""), _MISSING)
            if factor is not _MISSING and factor > 1:
                sizes = {"config.data.crop_size": values.get("data.crop_size", _MISSING)}
                if values.get("data.name") == "synthetic":
                    sizes["config.data.synthetic.image_size"] = values.get("data.synthetic.image_size", _MISSING)
                for key, size in sizes.items():
                    if size is not _MISSING and size % factor:
                        errors.append(f"config.{method}.{DOWNSAMPLE_KEYS[method]}: expected a divisor of "
                                      f"{key} = {size} (maps are average-pooled by it), got {factor}")
            if method == "rawks" and values.get("data.scribbles") is False:
                errors.append("config.data.scribbles: expected True for method 'rawks' (it trains from "
                              "scribbles), got False")

    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


# ----------------------------------------------------------------------------- resume comparison


def flatten(config) -> dict:
    """{dotted key: JSON value} of a ConfigDict or a (nested) dict (tuples become lists)."""
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
    """{key: (previous value, new value)} of the keys that differ and are not in :data:`HARMLESS_KEYS`
    (a key absent on one side shows as ``"<absent>"``, except the keys of
    :data:`OPTIONAL_DEFAULTS`, which stand for their default when absent)."""
    a, b = ({**OPTIONAL_DEFAULTS, **flatten(c)} for c in (previous, new))
    changed = {}
    for key in sorted(set(a) | set(b)):
        if key in HARMLESS_KEYS:
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            changed[key] = (va, vb)
    return changed
