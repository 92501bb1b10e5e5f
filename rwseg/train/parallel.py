"""Devices, mesh and sharding for data-parallel training (single or multi-host).

One mesh axis, ``"data"``, over every device of every process. The batch is sharded
along it (``NamedSharding(mesh, P("data"))``), parameters and optimiser state are
replicated (``P()``); ``jax.jit`` then inserts the gradient all-reduce itself, so the
step is the same pure function as on one device. Each process feeds its own slice of
the global batch (:func:`global_batch`).

Per-example solvers (Krylov loops, GMF iterations) are not left to ``jit``'s
partitioner, which would turn a vmapped loop over the sharded batch into one loop with
an all-reduce in its condition: the steps trace the models under
:func:`rwseg.layers.device_local.batch_axis`, and the models run their solvers with
:func:`rwseg.layers.device_local.map_examples` (``jax.shard_map`` over ``"data"``), so
each device iterates on its own examples. :func:`collectives_in_loops` checks a compiled
step for collectives inside while loops.

Multi-host: call :func:`initialize` first (``jax.distributed.initialize``); on CPU it
selects the gloo collectives so that processes on one machine can run together.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["initialize", "make_mesh", "batch_sharding", "replicated", "global_batch", "replicate",
           "local_batch_size", "to_host", "collectives_in_loops", "while_loop_count"]


HEARTBEAT_TIMEOUT_SECONDS = 60  # a process silent this long is declared dead (jax's default: 100)


def initialize(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0, *,
               heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_SECONDS) -> None:
    """``jax.distributed.initialize`` when ``num_processes > 1`` (no-op otherwise).

    On CPU-only machines the gloo cross-process collectives are enabled first (jax's
    CPU default has none). Must run before any other JAX call.

    A lost process (killed, crashed, its host gone): the others stop within
    ``heartbeat_timeout_seconds`` (plus a few seconds) and never hang: when the dead
    process's connections are closed (a crash on a live host), the next collective fails
    at once (:mod:`rwseg.train.preemption`, ``rwseg train`` exits with status 76); otherwise
    the coordination service declares it dead after ``heartbeat_timeout_seconds`` without
    a heartbeat and jax ends every other process with an abort (SIGABRT), which ``rwseg
    train`` turns into status 76 as well
    (:func:`rwseg.train.preemption.exit_lost_process_on_abort`).

    Args:
      coordinator_address: ``host:port`` of process 0.
      num_processes: the number of processes.
      process_id: this process's index.
      heartbeat_timeout_seconds: see above (``jax.distributed.initialize``).
    """
    if num_processes <= 1:
        return
    if not coordinator_address:
        raise ValueError("coordinator_address: expected host:port when num_processes > 1, got ''")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=int(heartbeat_timeout_seconds))


def make_mesh() -> Mesh:
    """A 1-D mesh named ``"data"`` over all devices (Auto axis types; see stack notes).

    Returns:
      The ``jax.sharding.Mesh``.
    """
    return Mesh(np.asarray(jax.devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: the leading axis split over ``"data"``.

    Args:
      mesh: the device mesh.

    Returns:
      ``NamedSharding(mesh, P("data"))``.
    """
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of the state and of summed counts: replicated on every device.

    Args:
      mesh: the device mesh.

    Returns:
      ``NamedSharding(mesh, P())``.
    """
    return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """The per-process batch; raises unless the global batch splits over devices.

    Args:
      global_batch_size: the global batch (``config.batch_size``).
      mesh: the device mesh.

    Returns:
      ``global_batch_size // jax.process_count()``.
    """
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(f"batch_size: expected a multiple of the device count {n}, got {global_batch_size}")
    return global_batch_size // jax.process_count()


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Per-process numpy batch dict -> global jax arrays sharded along ``"data"``.

    Args:
      local: ``{name: (b, ...) numpy}``, this process's part of the batch.
      mesh: the device mesh.

    Returns:
      ``{name: (B, ...) jax.Array}``, B = b x the process count.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def replicate(tree, mesh: Mesh):
    """Place a pytree of (identical on every process) arrays replicated on the mesh.

    Args:
      tree: a pytree of arrays.
      mesh: the device mesh.

    Returns:
      The same tree of replicated ``jax.Array`` s.
    """
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def to_host(tree):
    """Fully replicated or global arrays -> numpy on every process.

    Args:
      tree: a pytree of ``jax.Array`` s.

    Returns:
      The same tree of numpy arrays (global arrays gathered over the processes).
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


# --------------------------------------------------------------------------- compiled-step inspection

_COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|collective-permute|reduce-scatter|all-to-all)(-start)?\(")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r"\bwhile\(.*?condition=%?([\w.\-]+).*?body=%?([\w.\-]+)")
_CALLED = re.compile(r"\b(?:to_apply|calls|condition|body|true_computation|false_computation)=%?([\w.\-]+)"
                     r"|\b(?:branch_computations|called_computations)=\{([^}]*)\}")


def _computations(hlo_text: str) -> dict:
    """Compiled HLO module text -> {computation name: its instruction lines}."""
    comps, name = {}, None
    for line in hlo_text.splitlines():
        if name is None:
            m = _HEADER.match(line)
            if m and not line.startswith((" ", "\t")):
                name = m.group(1)
                comps[name] = []
        elif line.strip() == "}":
            name = None
        else:
            comps[name].append(line)
    return comps


def collectives_in_loops(hlo_text: str) -> list[str]:
    """Collectives that run inside a ``while`` loop of a compiled module (``[]`` if none).

    For every ``while`` op, its condition and body computations and everything they call
    (fusions, reductions, branches, nested loops) are searched for all-reduce / all-gather /
    collective-permute / reduce-scatter / all-to-all. A collective in a loop synchronises
    every device once per iteration.

    Args:
      hlo_text: ``jax.jit(f).lower(...).compile().as_text()``.

    Returns:
      ``"computation: instruction"`` strings.
    """
    comps = _computations(hlo_text)
    roots = []
    for lines in comps.values():
        for line in lines:
            m = _WHILE.search(line)
            if m:
                roots += [m.group(1), m.group(2)]
    seen, stack, found = set(), list(roots), []
    while stack:
        name = stack.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            if _COLLECTIVE.search(line):
                found.append(f"{name}: {line.strip()[:200]}")
            for m in _CALLED.finditer(line):
                if m.group(1):
                    stack.append(m.group(1))
                else:
                    stack += [n.strip().lstrip("%") for n in m.group(2).split(",") if n.strip()]
    return found


def while_loop_count(hlo_text: str) -> int:
    """Number of ``while`` ops in a compiled module's text.

    Args:
      hlo_text: a compiled module's text.

    Returns:
      The count (int).
    """
    return sum(bool(_WHILE.search(line)) for lines in _computations(hlo_text).values() for line in lines)
