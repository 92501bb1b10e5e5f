"""Memory levers of the models: bfloat16 compute and rematerialisation.

**Compute dtype** (``config.compute_dtype``, :func:`rwseg.layers.convs.set_compute_dtype`). With
``"bfloat16"`` every :class:`rwseg.layers.convs.ConvBlock` (the backbone's stem,
encoder, ASPP and projection blocks, and the small image networks of the layers: SPN
guidance, RAWKS boundary, the dilated decoder) runs its convolution, GroupNorm and ReLU
in bfloat16: their inputs and kernels are cast to bfloat16 at the op
(``nnx.Conv(dtype=...)``), the parameters stay float32 (``param_dtype``), and so does
the optimiser state built from them. GroupNorm still takes its mean and variance in
float32 (flax reduces in float32). The activations these blocks keep for the backward
pass are bfloat16: half the bytes.

Everything else stays float32, on purpose:

* the *heads* that are plain ``nnx.Conv`` (the backbone classifier, SPN gates, RWN
  ``theta``, GCRF pairwise embedding, dilated affinity head, RAWKS boundary output) keep
  ``dtype=None``: flax promotes their bfloat16 input with the float32 kernel, so logits,
  gates, affinities, similarities and boundaries come out float32;
* so every solver (the RWN walk and its CG, GMF, the SPN recurrence, the RAWKS solve,
  dilated propagation) receives float32 operands: their residuals, scan and
  ``while_loop`` carries and the reductions that decide convergence (``tol`` tests
  against a relative residual) are float32. In bfloat16 (8 bits of mantissa) a relative
  residual cannot go below ~4e-3, so a ``tol`` of 1e-5 would never be met, and a
  recurrence over hundreds of SPN rows would accumulate rounding in its carry;
* losses (softmax cross-entropy over float32 logits) and gradient accumulation are float32.

**Rematerialisation** (``config.remat``, :func:`remat_scope`). Inside
``with remat_scope(True):`` (the train step enters it while tracing the loss), every
``ConvBlock`` is wrapped in ``nnx.remat`` with ``jax.checkpoint_policies.nothing_saveable``
(the backward pass keeps each block's input only and recomputes its convolution, norm
and ReLU), and the layers with unrolled refinements pass ``remat=True`` to their
operators, which checkpoint each step of their ``lax.scan`` (GMF layers of
:func:`rwseg.gcrf.gmf`, walk steps of :func:`rwseg.rwn.random_walk`): only the scan
carries are saved per step. Gradients are unchanged (the same computation, run twice).
"""

from __future__ import annotations

import contextvars
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rwseg._platform import context_value

__all__ = ["COMPUTE_DTYPES", "group_norm", "remat_scope", "remat_enabled", "call_block"]

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

_REMAT: contextvars.ContextVar = contextvars.ContextVar("rwseg_remat", default=False)


def group_norm(norm: nnx.GroupNorm, x):
    """``norm(x)`` (an ``nnx.GroupNorm`` over the last axis), normalising in ``x``'s dtype.

    flax's GroupNorm subtracts its float32 mean from the input and scales in float32, so a
    bfloat16 input leaves float32 intermediates for the backward pass: measured on a
    v5e ahead-of-time compile of the baseline's train step at 512x512, bfloat16 blocks
    *doubled* the temporary memory (0.35 -> 0.73 GiB per chip). Here the statistics are
    still reduced in float32 (flax's fast variance ``E[x^2] - E[x]^2``, clamped at 0; under
    ``jax.checkpoint``, so that the backward pass recomputes them from ``x`` instead of
    keeping a float32 copy of it), but they are folded with ``scale`` and ``bias`` into one per-(example, channel) multiplier
    and offset, cast to ``x``'s dtype, and the normalisation is ``x * mul + add`` in that
    dtype. A float32 ``x`` (or a norm without a compute dtype) goes to ``norm`` itself.

    Args:
      norm: the GroupNorm (its ``num_groups``, ``epsilon``, ``scale`` and ``bias``).
      x: (B, ..., C) activations.

    Returns:
      (B, ..., C) in ``x.dtype``.
    """
    if norm.dtype is None or x.dtype == jnp.float32 or not (norm.use_scale and norm.use_bias):
        return norm(x)
    c, g = x.shape[-1], int(norm.num_groups)
    grouped = x.reshape(x.shape[:-1] + (g, c // g))
    axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def stats(v):  # recomputed in the backward pass: no float32 copy of x is kept for it
        wide = v.astype(jnp.float32)
        mean = jnp.mean(wide, axis=axes, keepdims=True)
        return mean, jnp.maximum(jnp.mean(jnp.square(wide), axis=axes, keepdims=True) - jnp.square(mean), 0.0)

    mean, var = stats(grouped)
    mul = jax.lax.rsqrt(var + norm.epsilon) * norm.scale[...].astype(jnp.float32).reshape(g, c // g)
    add = norm.bias[...].astype(jnp.float32).reshape(g, c // g) - mean * mul
    return (grouped * mul.astype(x.dtype) + add.astype(x.dtype)).reshape(x.shape)


def remat_scope(enabled: bool = True):
    """Within this context (entered where a loss is traced) the models rematerialise:
    :func:`call_block` checkpoints each ``ConvBlock`` and :func:`remat_enabled` is True
    (layers pass it to their unrolled operators).

    Args:
      enabled: whether to rematerialise inside the context.

    Returns:
      A context manager (yields nothing).
    """
    return context_value(_REMAT, bool(enabled))


def remat_enabled() -> bool:
    """Whether the enclosing :func:`remat_scope` asks for rematerialisation.

    Returns:
      True inside ``remat_scope(True)``, else False.
    """
    return _REMAT.get()


def _apply(block, x):
    return block.forward(x)


_apply_remat = nnx.remat(_apply, policy=jax.checkpoint_policies.nothing_saveable)


def call_block(block, x):
    """``block.forward(x)``, under ``nnx.remat`` (save the input only) inside ``remat_scope(True)``.

    Args:
      block: a :class:`rwseg.layers.convs.ConvBlock`.
      x: its input.

    Returns:
      The block's output.
    """
    return _apply_remat(block, x) if remat_enabled() else _apply(block, x)
