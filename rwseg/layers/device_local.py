"""Per-example solvers that run on each device's own shard of the batch.

Under ``jax.jit`` with the batch sharded over a mesh, ``jax.vmap`` of an iterative
solver (a ``lax.while_loop`` of the converged RWN walk, the RAWKS refinement, converged
GMF) is partitioned by XLA as *one* loop over the global batch: its condition ("does any
example still iterate?") becomes an all-reduce, so every device runs as many iterations
as the slowest example of the whole global batch and synchronises once per iteration.
:func:`map_examples` runs such a per-example function under ``jax.shard_map`` over the
batch axis instead: each device loops over its own examples only, and the compiled
loops hold no collective.

The train and eval steps (:mod:`rwseg.train`) trace the models inside
``with batch_axis(mesh):``; the models call :func:`map_examples` wherever they would
``jax.vmap`` a per-example solver. Outside that context (one device, plain calls,
tests) :func:`map_examples` is exactly ``jax.vmap``; with a mesh the results are the
same up to float rounding (each example is solved independently either way).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.sharding import Mesh, PartitionSpec as P

__all__ = ["batch_axis", "current_batch_axis", "map_examples"]

_BATCH_AXIS: contextvars.ContextVar = contextvars.ContextVar("rwseg_batch_axis", default=None)


@contextlib.contextmanager
def batch_axis(mesh: Mesh, axis: str = "data"):
    """Within this context, :func:`map_examples` splits the batch over ``mesh``'s ``axis``.

    Enter it where the step function is traced (inside the function given to ``jax.jit``).
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"axis: expected one of the mesh axes {mesh.axis_names}, got {axis!r}")
    token = _BATCH_AXIS.set((mesh, axis))
    try:
        yield
    finally:
        _BATCH_AXIS.reset(token)


def current_batch_axis():
    """``(mesh, axis)`` of the enclosing :func:`batch_axis`, or ``None``."""
    return _BATCH_AXIS.get()


def map_examples(fn, *batched, shared=()):
    """``jax.vmap(lambda *b: fn(*b, *shared))(*batched)``, device-local under :func:`batch_axis`.

    batched: arrays (or pytrees of arrays) with the batch as leading axis, split over
    the devices; shared: arguments every example uses whole (e.g. parameters; they are
    replicated, and receive the summed gradient of all devices). Every output of ``fn``
    gets the batch as leading axis (as ``vmap``). Falls back to plain ``vmap`` when no
    mesh is active, the mesh axis has one device, or the batch does not split evenly.
    """
    shared = tuple(shared)

    def run(b, s):
        return jax.vmap(lambda *x: fn(*x, *s))(*b)

    context = current_batch_axis()
    if context is None:
        return run(batched, shared)
    mesh, axis = context
    devices = mesh.shape[axis]
    size = jax.tree.leaves(batched)[0].shape[0]
    if devices == 1 or size % devices:
        return run(batched, shared)
    # check_vma=False: jax 0.10's custom_linear_solve (every implicit solve here) rejects
    # operands of mixed varying-ness under the vma type checks ("requires varying manual
    # axes to match"). Every output is split along the axis, so no replication promise is
    # made that the check would verify; the transpose of the replicated ``shared`` inputs
    # sums their cotangents over the devices, as the check would.
    return jax.shard_map(run, mesh=mesh, in_specs=(P(axis), P()), out_specs=P(axis),
                         check_vma=False)(batched, shared)
