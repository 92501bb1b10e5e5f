"""Small numerical helpers shared by the operator modules: safe division and masked means.

One definition of each, so that "a mean over the valid pixels" and "a ratio that is
``fill`` where the denominator vanishes" mean the same thing in every module.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["safe_divide", "masked_mean", "channel_scale"]


def safe_divide(num, den, fill=0):
    """``num / den`` where ``den != 0``, else ``fill``, with finite gradients everywhere.

    The double ``where`` keeps the unselected branch finite, so the gradient of the
    result is finite (and zero from ``den``) where ``den == 0``, which a plain
    ``where(den != 0, num / den, fill)`` does not give.

    Args:
        num: numerator, any shape broadcastable with ``den``.
        den: denominator.
        fill: value where ``den == 0`` (e.g. ``0`` or ``jnp.nan``).

    Returns:
        The broadcast quotient, in ``result_type(num, den)``.
    """
    num, den = jnp.asarray(num), jnp.asarray(den)
    nz = den != 0
    out = num / jnp.where(nz, den, jnp.ones((), den.dtype))
    return jnp.where(nz, out, jnp.asarray(fill, out.dtype))


def masked_mean(values, mask, *, empty=0):
    """``sum(values[mask]) / count(mask)``: the mean over the masked entries.

    Entries outside ``mask`` never enter the sum (a NaN there does not leak). With no
    entry selected the result is ``empty`` (``0`` by default, e.g. a loss over an image
    with no labelled pixel; ``jnp.nan`` for a metric that is undefined then).

    Args:
        values: array of any shape, floating (integer counts are promoted to the default
            float dtype).
        mask: boolean (or 0/1) array broadcastable to ``values``.
        empty: value returned when the mask selects nothing.

    Returns:
        A scalar in the floating dtype of ``values``.
    """
    values = jnp.asarray(values)
    if not jnp.issubdtype(values.dtype, jnp.floating):
        values = values.astype(jnp.result_type(float))
    mask = jnp.broadcast_to(jnp.asarray(mask).astype(bool), values.shape)
    total = jnp.sum(jnp.where(mask, values, jnp.zeros((), values.dtype)))
    count = jnp.sum(mask).astype(values.dtype)
    return safe_divide(total, count, empty)


def channel_scale(x):
    """``max |x|`` over every axis but the last (per channel), 1 where that is 0 or not finite.

    The scale by which a linear solve divides its right-hand side so that no intermediate
    leaves the normal floating-point range (a NaN input stays NaN: its scale is 1).

    Args:
        x: ``(..., C)`` float array (a 1-d array is one channel).

    Returns:
        ``(C,)`` (or a scalar for 1-d ``x``) positive scales in the dtype of ``x``.
    """
    s = jnp.max(jnp.abs(x), axis=tuple(range(x.ndim - 1)) if x.ndim >= 2 else None)
    return jnp.where(jnp.isfinite(s) & (s > 0), s, jnp.ones((), s.dtype))
