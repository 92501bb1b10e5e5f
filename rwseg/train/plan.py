"""Ahead-of-time plans: compile the real train and eval steps for a TPU pod from any machine.

``rwseg plan --config NAME[:smoke] --topology v5e:16x16`` (:mod:`rwseg.cli`) calls
:func:`plan_config`. With ``libtpu`` installed (``pip install 'rwseg[tpu]'``) JAX can
compile for a TPU topology this machine does not have: the compile-only devices of
``jax.experimental.topologies.get_topology_desc`` form a one-axis ``"data"`` mesh, the
train state is built abstractly (:func:`rwseg.train.state.create` with ``abstract=True``:
``jax.ShapeDtypeStruct`` leaves, nothing allocated) and the steps of
:func:`rwseg.train.state.make_train_step` and :func:`rwseg.train.evaluate.make_eval_step`
— the functions ``rwseg train`` runs — are lowered and compiled for it. The compiled
executables give, per chip:

* memory (``compiled.memory_analysis()``): argument, output, aliased (donated) and
  temporary bytes; the peak is ``argument + output - alias + temp``, compared with the
  chip's HBM (:data:`HBM_GIB`). The TPU compiler itself refuses a program whose
  temporaries exceed the HBM (``RESOURCE_EXHAUSTED``): the plan records that as a step
  that does not fit, with the compiler's figure;
* cost (``compiled.cost_analysis()``): FLOPs and bytes accessed, and the TPU cost
  model's ``optimal_seconds`` where it gives one (loop-free programs; with a while loop
  or scan inside it is negative, and FLOPs/bytes count a loop body once, not per trip);
* the collectives of the compiled HLO (count and result bytes per kind, each counted
  once where it appears in the program text) and those inside a ``while`` loop
  (:func:`rwseg.train.parallel.collectives_in_loops`);
* the SPN kernel the program uses (the Mosaic kernel shows as a ``tpu_custom_call``).

Tracing happens on the local backend, so the plan traces under
:func:`rwseg._platform.compile_platform` (``"tpu"``): operators that pick an
implementation by platform (``rwseg.spn``'s ``"auto"``) pick the TPU's.

When a step does not fit, :func:`suggest_fit` compiles the train step again with the
levers turned on one after another (``remat``, then ``compute_dtype="bfloat16"``, then
``microbatches`` 2, 4, ..., then a smaller batch per chip) and reports the first setting
that fits.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import re
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rwseg import data
from rwseg._platform import compile_platform
from rwseg.train import parallel

__all__ = ["HBM_GIB", "PlanError", "StepPlan", "Plan", "hbm_bytes", "topology_mesh", "plan_config",
           "suggest_fit", "compare_levers", "format_levers", "LEVERS", "collective_stats", "format_plan", "GIB"]

GIB = 1 << 30

# HBM per chip (GiB) of each TPU generation (the first part of a topology name, "v5e:16x16").
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}

TPU_EXTRA = "pip install 'rwseg[tpu]'"


class PlanError(Exception):
    """A plan cannot be made (no libtpu, unknown topology, a config that does not split)."""


def hbm_bytes(topology: str) -> int:
    """HBM bytes per chip of ``topology`` (``"v5e:16x16"`` -> 16 GiB), from :data:`HBM_GIB`.

    Args:
      topology: a TPU topology name, ``GENERATION:SHAPE``.

    Returns:
      Bytes of high-bandwidth memory per chip.

    Raises:
      PlanError: an unknown generation (the message names ``--topology``).
    """
    generation = str(topology).split(":", 1)[0].lower()
    if generation not in HBM_GIB:
        raise PlanError(f"--topology: expected a name starting with one of {', '.join(HBM_GIB)} "
                        f"(e.g. v5e:16x16), got {topology!r}")
    return HBM_GIB[generation] * GIB


def topology_mesh(topology: str, platform: str = "tpu") -> Mesh:
    """A one-axis ``"data"`` mesh over the compile-only devices of ``topology``.

    Args:
      topology: a topology name, e.g. ``"v5e:2x2"``.
      platform: the compile-only platform (``"tpu"``).

    Returns:
      A :class:`jax.sharding.Mesh` over every device of the topology, axis ``"data"``.

    Raises:
      PlanError: libtpu is not installed (the message names the ``rwseg[tpu]`` extra), or
        jax does not know the topology.
    """
    if platform == "tpu" and importlib.util.find_spec("libtpu") is None:
        raise PlanError(f"compiling for a TPU topology needs libtpu: {TPU_EXTRA}")
    from jax.experimental import topologies

    # compile-only devices claim no chip: let several planners (and a process already holding libtpu's
    # lock file) load libtpu at once; read when libtpu starts, i.e. before the first topology
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topo = topologies.get_topology_desc(topology_name=topology, platform=platform)
    except Exception as e:  # jax raises RuntimeError / XlaRuntimeError / ValueError here
        raise PlanError(f"--topology: jax cannot make compile-only {platform} devices for {topology!r}: {e}") from e
    return Mesh(np.asarray(topo.devices), ("data",))


# --------------------------------------------------------------------------- HLO inspection

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(_COLLECTIVE_KINDS)
                          + r")(-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def _shape_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def collective_stats(hlo_text: str) -> dict:
    """``{kind: (count, bytes)}`` of the collectives in a compiled module's text.

    kind: all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all (an
    asynchronous ``-start``/``-done`` pair counts once, by its start); bytes: the result
    shape's size (a tuple result: the sum of its arrays; an async start's tuple holds
    the operand as well, so its bytes are halved). Each instruction is counted once,
    also when it sits in a loop body.

    Args:
      hlo_text: ``compiled.as_text()`` of a jitted step.

    Returns:
      ``{kind: (count, result bytes)}`` for the kinds present.
    """
    stats = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        size = _shape_bytes(m.group(1))
        if m.group(3) and m.group(1).startswith("(") and m.group(2) in ("all-gather", "collective-permute",
                                                                         "all-reduce"):
            size //= 2  # ((operand), (result)) tuple of an async start
        count, total = stats.get(m.group(2), (0, 0))
        stats[m.group(2)] = (count + 1, total + size)
    return stats


def _spn_kernel(hlo_text: str) -> str:
    if "tpu_custom_call" in hlo_text:
        return "pallas (Mosaic)"
    return "-"


# --------------------------------------------------------------------------- plans


@dataclasses.dataclass
class StepPlan:
    """What compiling one step for the topology gave (bytes per chip)."""

    name: str
    fits: bool
    hbm_bytes: int
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    flops: float = float("nan")
    bytes_accessed: float = float("nan")
    optimal_seconds: float | None = None
    collectives: dict = dataclasses.field(default_factory=dict)
    collectives_in_loops: list = dataclasses.field(default_factory=list)
    while_loops: int = 0
    kernel: str = "-"
    compile_seconds: float = 0.0
    error: str = ""  # the compiler's RESOURCE_EXHAUSTED message when it refused the step

    @property
    def peak_bytes(self) -> int:
        """argument + output - aliased + temporaries (per chip)."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def collective_bytes(self) -> int:
        return sum(b for _, b in self.collectives.values())

    @property
    def collective_count(self) -> int:
        return sum(c for c, _ in self.collectives.values())


@dataclasses.dataclass
class Plan:
    """A config's steps compiled for a topology."""

    method: str
    topology: str
    num_chips: int
    hbm_bytes: int
    batch_size: int
    crop_size: int
    compute_dtype: str
    remat: bool
    microbatches: int
    steps: list
    suggestion: str = ""
    param_bytes: int = 0  # the model's parameters (float32), replicated on every chip

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.steps)

    def step(self, name: str) -> StepPlan:
        """The plan of one step.

        Args:
          name: ``"train"`` or ``"eval"``.

        Returns:
          Its :class:`StepPlan`.
        """
        return next(s for s in self.steps if s.name == name)


_EXHAUSTED = re.compile(r"([\d.]+)([KMGT]?)i?B?\)?\s+exceeds\s+available\s+HBM\s+\(([\d.]+)([KMGT]?)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _exhausted_bytes(message: str) -> int:
    """The temporaries' size a RESOURCE_EXHAUSTED message names (0 if it names none)."""
    m = _EXHAUSTED.search(message)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0


def _compile(name: str, lowered_fn, hbm: int) -> StepPlan:
    start = time.perf_counter()
    try:
        compiled = lowered_fn().compile()
    except Exception as e:  # the TPU compiler refuses a program that does not fit
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        first = next((l for l in message.splitlines() if "RESOURCE_EXHAUSTED" in l), message)
        return StepPlan(name, False, hbm, temp_bytes=_exhausted_bytes(message), error=first.strip()[:300],
                        compile_seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    text = compiled.as_text()
    optimal = cost.get("optimal_seconds")
    step = StepPlan(
        name, True, hbm,
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        flops=float(cost.get("flops", float("nan"))), bytes_accessed=float(cost.get("bytes accessed", float("nan"))),
        optimal_seconds=float(optimal) if optimal is not None and optimal >= 0 else None,
        collectives=collective_stats(text), collectives_in_loops=parallel.collectives_in_loops(text),
        while_loops=parallel.while_loop_count(text), kernel=_spn_kernel(text), compile_seconds=seconds)
    step.fits = step.peak_bytes <= hbm
    return step


def _planning_config(config, num_chips: int, batch_per_chip, crop):
    from rwseg.train.config_check import ConfigError, check_config

    config = copy.deepcopy(config)
    with config.unlocked() if hasattr(config, "unlocked") else _nothing():
        if batch_per_chip is not None:
            config.batch_size = int(batch_per_chip) * num_chips
            config.eval_batch_size = int(batch_per_chip) * num_chips
        if crop is not None:
            config.data.crop_size = int(crop)
    try:
        check_config(config, num_devices=num_chips, num_processes=1)
    except ConfigError as e:
        raise PlanError(str(e)) from e
    return config


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _statistics(config, num_classes: int) -> dict:
    """Dataset statistics of the right shapes (from a fixed random label map; only their shapes matter)."""
    from rwseg.models import dataset_statistics, model_class

    if getattr(model_class(config.method), "dataset_statistics", None) is None:
        return {}
    labels = np.random.default_rng(0).integers(0, num_classes, (2, 32, 32)).astype(np.int32)
    return dataset_statistics(config, labels)


def plan_config(config, topology: str, *, batch_per_chip: int | None = None, crop: int | None = None,
                hbm_gib: float | None = None, steps=("train", "eval"), platform: str = "tpu",
                mesh: Mesh | None = None) -> Plan:
    """Compile ``config``'s train and/or eval step for ``topology`` and measure them.

    Args:
      config: a training config (``rwseg.configs.get_config(name, arg)`` or a file's).
      topology: a TPU topology name, e.g. ``"v5e:16x16"``, ``"v4:4x4x8"``.
      batch_per_chip: examples per chip (the global ``batch_size`` and
        ``eval_batch_size`` become ``batch_per_chip * chips``); default: the config's
        ``batch_size``, which must split over the chips.
      crop: training (and evaluation) crop size; default ``config.data.crop_size``.
      hbm_gib: HBM per chip to plan against; default the generation's (:data:`HBM_GIB`).
      steps: which of ``"train"`` and ``"eval"`` to compile.
      platform: the compile-only platform (``"tpu"``).
      mesh: a mesh to reuse (default :func:`topology_mesh` of ``topology``).

    Returns:
      A :class:`Plan` (``plan.fits``: every step fits its chip's HBM).

    Raises:
      PlanError: no libtpu, an unknown topology, or a config that does not check out
        for that many chips (the message names the key).
    """
    from rwseg.train.evaluate import make_eval_step
    from rwseg.train.state import create, make_train_step

    hbm = int(float(hbm_gib) * GIB) if hbm_gib is not None else hbm_bytes(topology)
    mesh = mesh if mesh is not None else topology_mesh(topology, platform)
    chips = int(mesh.devices.size)
    config = _planning_config(config, chips, batch_per_chip, crop)
    num_classes = data.dataset_info(config.data.name).num_classes
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    b, s = int(config.batch_size), int(config.data.crop_size)
    results = []
    with compile_platform(platform):
        setup = create(config, num_classes, _statistics(config, num_classes), abstract=True)
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), setup.state)
        batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), np.float32, sharding=shard),
                 "label": jax.ShapeDtypeStruct((b, s, s), np.int32, sharding=shard)}
        if bool(config.data.scribbles):
            batch["scribbles"] = jax.ShapeDtypeStruct((b, s, s), np.int32, sharding=shard)
        for name in steps:
            if name == "train":
                fn = make_train_step(setup, mesh)
                step = jax.ShapeDtypeStruct((), np.int32, sharding=rep)
                results.append(_compile("train", lambda: fn.lower(state, batch, step), hbm))
            elif name == "eval":
                fn = make_eval_step(setup.graphdef, mesh, num_classes, config.trimap_widths, config.boundary_tolerance)
                eval_state = {k: v for k, v in state.items() if k != "opt_state"}
                eval_batch = {k: batch[k] for k in ("image", "label")}
                results.append(_compile("eval", lambda: fn.lower(eval_state, eval_batch), hbm))
            else:
                raise PlanError(f"steps: expected 'train' and/or 'eval', got {name!r}")
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.state["params"]))
    return Plan(config.method, topology, chips, hbm, b, s, str(config.get("compute_dtype", "float32")),
                bool(config.get("remat", False)), int(config.get("microbatches", 1)), results,
                param_bytes=int(param_bytes))


def _with(config, **changes):
    config = copy.deepcopy(config)
    with config.unlocked() if hasattr(config, "unlocked") else _nothing():
        for key, value in changes.items():
            config[key] = value
    return config


def suggest_fit(config, topology: str, *, batch_per_chip: int, crop: int | None = None,
                hbm_gib: float | None = None, max_tries: int = 6, mesh: Mesh | None = None,
                step_names=("train",)) -> tuple[str | None, Plan | None, list]:
    """The first setting, in the order a pod user reaches for them, whose steps fit.

    Tries, cumulatively: ``remat=True``; ``compute_dtype="bfloat16"``; ``microbatches``
    2, 4, 8 (those dividing ``batch_per_chip``); then ``batch_per_chip`` halved (with the
    levers on) down to 1. Compiles ``step_names`` once per candidate, at most
    ``max_tries`` candidates.

    Args:
      config: a training config.
      topology: as for :func:`plan_config`.
      batch_per_chip: the examples per chip that did not fit.
      crop: as for :func:`plan_config`.
      hbm_gib: as for :func:`plan_config`.
      max_tries: the most candidates to compile.
      mesh: a mesh to reuse (default :func:`topology_mesh` of ``topology``).
      step_names: the steps that must fit.

    Returns:
      ``(flags, plan, tried)``: the first fitting setting as command-line flags (e.g.
      ``"--config.remat=True --config.compute_dtype=bfloat16"``) and its :class:`Plan`,
      ``(None, None, tried)`` when none of the tried settings fits; ``tried``: the flags
      of every candidate compiled.
    """
    mesh = mesh if mesh is not None else topology_mesh(topology)
    candidates, levers = [], {}
    if not bool(config.get("remat", False)):
        levers = dict(levers, remat=True)
        candidates.append((dict(levers), batch_per_chip))
    if config.get("compute_dtype", "float32") != "bfloat16":
        levers = dict(levers, compute_dtype="bfloat16")
        candidates.append((dict(levers), batch_per_chip))
    for m in (2, 4, 8):
        if m > int(config.get("microbatches", 1)) and batch_per_chip % m == 0:
            candidates.append((dict(levers, microbatches=m), batch_per_chip))
    b = batch_per_chip // 2
    while b >= 1:
        candidates.append((dict(levers), b))
        b //= 2
    tried = []
    for changes, b in candidates[:max(0, int(max_tries))]:
        flags = " ".join(f"--config.{k}={v}" for k, v in changes.items())
        flags = (flags + (f" --batch_per_chip {b}" if b != batch_per_chip else "")).strip()
        plan = plan_config(_with(config, **changes), topology, batch_per_chip=b, crop=crop, hbm_gib=hbm_gib,
                           steps=step_names, mesh=mesh)
        tried.append(flags)
        if plan.fits:
            return flags, plan, tried
    return None, None, tried


LEVERS = (("remat", {"remat": True}), ("bfloat16", {"compute_dtype": "bfloat16"}), ("microbatches=2", {"microbatches": 2}))


def compare_levers(config, topology: str, *, batch_per_chip: int, crop: int | None = None,
                   hbm_gib: float | None = None, mesh: Mesh | None = None, base: Plan | None = None) -> list:
    """What each lever saves: the train step compiled with each of :data:`LEVERS` alone.

    Args:
      config: a training config.
      topology: as for :func:`plan_config`.
      batch_per_chip: examples per chip (microbatches are skipped when they do not divide it).
      crop: as for :func:`plan_config`.
      hbm_gib: as for :func:`plan_config`.
      mesh: a mesh to reuse.
      base: the plan of ``config`` itself (compiled when not given).

    Returns:
      ``[(name, StepPlan)]``: ``"as configured"`` first, then each lever that is not already on.
    """
    mesh = mesh if mesh is not None else topology_mesh(topology)
    kw = dict(batch_per_chip=batch_per_chip, crop=crop, hbm_gib=hbm_gib, steps=("train",), mesh=mesh)
    base = base if base is not None else plan_config(config, topology, **kw)
    rows = [("as configured", base.step("train"))]
    for name, changes in LEVERS:
        key, value = next(iter(changes.items()))
        if config.get(key, None) == value or (key == "microbatches" and batch_per_chip % value):
            continue
        rows.append((name, plan_config(_with(config, **changes), topology, **kw).step("train")))
    return rows


def format_levers(rows) -> str:
    """A markdown table of :func:`compare_levers`: temp and peak bytes per chip, and the saving in
    peak bytes (what decides the fit; a step's temporaries can be zero when XLA aliases them all).

    Args:
      rows: ``[(name, StepPlan)]`` from :func:`compare_levers`, the configured step first.

    Returns:
      The table's text.
    """
    base = rows[0][1]
    lines = ["| train step | temp / chip | peak / chip | peak saved | GFLOP |", "|---|---|---|---|---|"]
    for name, s in rows:
        saved = "-" if s is base or s.error or base.error else f"{100 * (1 - s.peak_bytes / base.peak_bytes):.0f} %"
        lines.append(f"| {name} | {_gib(s.temp_bytes)} | {_gib(s.peak_bytes) if not s.error else 'over HBM'} | "
                     f"{saved} | {s.flops / 1e9:.3g} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report


def _gib(n) -> str:
    return f"{n / GIB:.2f} GiB"


def format_plan(plan: Plan) -> str:
    """A markdown table of a :class:`Plan`: one column per step, one row per quantity.

    Args:
      plan: from :func:`plan_config`.

    Returns:
      A header line and the table's text.
    """
    head = (f"rwseg plan: {plan.method} on {plan.topology} ({plan.num_chips} chips, {_gib(plan.hbm_bytes)} HBM each); "
            f"batch {plan.batch_size} ({plan.batch_size // plan.num_chips} per chip), crop {plan.crop_size}, "
            f"{plan.compute_dtype}, remat {'on' if plan.remat else 'off'}, microbatches {plan.microbatches}; "
            f"parameters {plan.param_bytes / (1 << 20):.2f} MiB")

    def collectives(s):
        if not s.collectives:
            return "none"
        return ", ".join(f"{k} {c}x {b / (1 << 20):.2f} MiB" for k, (c, b) in sorted(s.collectives.items()))

    rows = [
        ("fits", lambda s: "yes" if s.fits else "**no**"),
        ("argument (per chip)", lambda s: _gib(s.argument_bytes) if not s.error else "-"),
        ("output (per chip)", lambda s: _gib(s.output_bytes) if not s.error else "-"),
        ("aliased (donated)", lambda s: _gib(s.alias_bytes) if not s.error else "-"),
        ("temp (per chip)", lambda s: _gib(s.temp_bytes) + (" (compiler's figure)" if s.error else "")),
        ("peak / HBM", lambda s: f"{_gib(s.peak_bytes)} / {_gib(s.hbm_bytes)} ({100 * s.peak_bytes / s.hbm_bytes:.0f} %)"
         if not s.error else "over HBM"),
        ("GFLOP (per chip, loop bodies once)", lambda s: f"{s.flops / 1e9:.3g}" if not s.error else "-"),
        ("GB accessed", lambda s: f"{s.bytes_accessed / 1e9:.3g}" if not s.error else "-"),
        ("cost model seconds", lambda s: f"{s.optimal_seconds:.4g}" if s.optimal_seconds is not None else
         ("n/a (loops)" if not s.error else "-")),
        ("collectives (count, result bytes)", lambda s: collectives(s) if not s.error else "-"),
        ("collectives inside loops", lambda s: str(len(s.collectives_in_loops)) if not s.error else "-"),
        ("while loops", lambda s: str(s.while_loops) if not s.error else "-"),
        ("SPN kernel", lambda s: (s.kernel if s.kernel != "-" else "scan") if plan.method == "spn" else "-"),
        ("compile seconds", lambda s: f"{s.compile_seconds:.1f}"),
    ]
    lines = [head, "", "| | " + " | ".join(s.name for s in plan.steps) + " |",
             "|---|" + "---|" * len(plan.steps)]
    lines += [f"| {label} | " + " | ".join(fn(s) for s in plan.steps) + " |" for label, fn in rows]
    for s in plan.steps:
        if s.error:
            lines.append(f"\n{s.name}: the TPU compiler refused it: {s.error}")
    return "\n".join(lines)
