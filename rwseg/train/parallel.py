"""Devices, mesh and sharding for data-parallel training (single or multi-host).

One mesh axis, ``"data"``, over every device of every process. The batch is sharded
along it (``NamedSharding(mesh, P("data"))``), parameters and optimiser state are
replicated (``P()``); ``jax.jit`` then inserts the gradient all-reduce itself, so the
step is the same pure function as on one device. Each process feeds its own slice of
the global batch (:func:`global_batch`).

Multi-host: call :func:`initialize` first (``jax.distributed.initialize``); on CPU it
selects the gloo collectives so that processes on one machine can run together.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["initialize", "make_mesh", "batch_sharding", "replicated", "global_batch", "replicate",
           "local_batch_size", "to_host"]


def initialize(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0) -> None:
    """``jax.distributed.initialize`` when ``num_processes > 1`` (no-op otherwise).

    On CPU-only machines the gloo cross-process collectives are enabled first (jax's
    CPU default has none). Must run before any other JAX call.
    """
    if num_processes <= 1:
        return
    if not coordinator_address:
        raise ValueError("coordinator_address: expected host:port when num_processes > 1, got ''")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def make_mesh() -> Mesh:
    """A 1-D mesh named ``"data"`` over all devices (Auto axis types; see stack notes)."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """The per-process batch; raises unless the global batch splits over devices."""
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(f"batch_size: expected a multiple of the device count {n}, got {global_batch_size}")
    return global_batch_size // jax.process_count()


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Per-process numpy batch dict -> global jax arrays sharded along ``"data"``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def replicate(tree, mesh: Mesh):
    """Place a pytree of (identical on every process) arrays replicated on the mesh."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def to_host(tree):
    """Fully replicated or global arrays -> numpy on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
