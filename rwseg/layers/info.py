"""Diagnostics every refinement layer returns with ``return_info=True``."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["RefinementInfo", "solved", "exact_steps"]


class RefinementInfo(NamedTuple):
    """Per-example diagnostics of a refinement layer (all arrays have the batch B as first axis).

    solves: (B,) int32, linear solves / converged iterations run per example (0 for a
        layer that runs an exact number of steps).
    nonconverged: (B,) int32, 1 where a solve did not reach its tolerance or its output
        holds a NaN/inf (a NaN result is never reported as converged), else 0.
    iterations: (B,) int32, solver iterations (or the exact step count).
    residual: (B,) float32, the largest relative residual over the classes of the
        solve (:class:`rwseg.linsolve.SolveInfo` ``residual``; 0 for exact steps).
    """

    solves: jnp.ndarray
    nonconverged: jnp.ndarray
    iterations: jnp.ndarray
    residual: jnp.ndarray

    def stats(self) -> dict:
        """``{"solves", "nonconverged"}``: the diagnostics the models' ``infer`` reports."""
        return {"solves": self.solves, "nonconverged": self.nonconverged}


def solved(converged, iterations, residual, *outputs) -> RefinementInfo:
    """Info of one solve per example from batched ``SolveInfo`` fields and the solve's outputs.

    converged: (B, ...) bool flags; iterations: (B,) int; residual: (B, ...) float;
    outputs: (B, ...) arrays checked for NaN/inf.
    """
    b = converged.shape[0]
    ok = jnp.all(jnp.reshape(converged, (b, -1)), axis=1)
    for out in outputs:
        ok &= jnp.all(jnp.isfinite(jnp.reshape(out, (b, -1))), axis=1)
    ok = jax.lax.stop_gradient(ok)
    res = jax.lax.stop_gradient(jnp.max(jnp.reshape(residual, (b, -1)), axis=1)).astype(jnp.float32)
    return RefinementInfo(jnp.ones((b,), jnp.int32), (~ok).astype(jnp.int32),
                          jnp.reshape(iterations, (b,)).astype(jnp.int32), res)


def exact_steps(batch_size: int, num_steps: int) -> RefinementInfo:
    """Info of a layer that ran exactly ``num_steps`` steps (no solve, nothing to converge)."""
    zeros = jnp.zeros((batch_size,), jnp.int32)
    return RefinementInfo(zeros, zeros, jnp.full((batch_size,), num_steps, jnp.int32),
                          jnp.zeros((batch_size,), jnp.float32))
