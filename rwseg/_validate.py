"""Argument checks shared by every rwseg operator.

Every check raises ``ValueError`` (wrong shape/value) or ``TypeError`` (wrong dtype)
with a message that names the argument, what was received and what was expected, e.g.
``weights: expected shape (H, W, K) = (8, 8, 4) matching x and offsets, got (8, 8, 5)``.

All checks here run on *static* information (shapes, dtypes, Python values), so they
work unchanged under ``jax.jit`` / ``jax.vmap``. Checks on array *values* (NaN, labels
out of range) cannot raise under ``jit``; operators that need them expose them through
``jax.experimental.checkify`` (see :func:`value_check`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_rank(name: str, x, rank: int, layout: str) -> None:
    """Checks an array's rank.

    Args:
        name: the argument's name, for the message.
        x: the array.
        rank: the expected number of dimensions.
        layout: the expected layout, for the message, e.g. ``"(H, W, C)"``.

    Raises:
        ValueError: ``x.ndim != rank``.
    """
    if np.ndim(x) != rank:
        raise ValueError(f"{name}: expected a rank-{rank} array {layout}, got shape {_shape(x)}")


def check_shape(name: str, x, expected: Sequence[int | None], layout: str) -> None:
    """Checks an array's shape.

    Args:
        name: the argument's name, for the message.
        x: the array.
        expected: the expected shape; ``None`` for an axis of any size.
        layout: the expected layout, for the message, e.g. ``"(H, W, K)"``.

    Raises:
        ValueError: ``x.shape`` does not match ``expected``.
    """
    shape = _shape(x)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        exp = "(" + ", ".join("?" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name}: expected shape {layout} = {exp}, got {shape}")


def _check_kind(name: str, x, kind, expected: str, hint: str) -> None:
    """TypeError naming ``name`` unless ``x``'s dtype is a ``kind`` (``jnp.floating``, ...)."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, kind):
        raise TypeError(f"{name}: expected {expected}, got dtype {dtype} (shape {_shape(x)}){hint}")


def check_floating(name: str, x) -> None:
    """Checks that an array has a floating-point dtype.

    Args:
        name: the argument's name, for the message.
        x: the array.

    Raises:
        TypeError: ``x`` has another dtype.
    """
    _check_kind(name, x, jnp.floating, "a floating-point array", "")


def check_integer(name: str, x) -> None:
    """Checks that an array has an integer dtype (labels, seeds).

    Args:
        name: the argument's name, for the message.
        x: the array.

    Raises:
        TypeError: ``x`` has another dtype.
    """
    _check_kind(name, x, jnp.integer, "an integer label array", "; cast with .astype(jnp.int32)")


def check_nonnegative_int(name: str, value, *, positive: bool = False) -> int:
    """Checks a static count or size.

    Args:
        name: the argument's name, for the message.
        value: the value; a Python or numpy int (not a bool).
        positive: reject 0 as well.

    Returns:
        ``int(value)``.

    Raises:
        TypeError: ``value`` is not an int.
        ValueError: ``value`` is negative (or 0 with ``positive``).
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a Python int, got {type(value).__name__} {value!r}")
    if value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name}: expected an int {bound}, got {value}")
    return int(value)


def value_check(pred, msg: str, *fmt_args, **fmt_kwargs) -> None:
    """A value check for the operators' ``checked=True`` mode (``checkify.debug_check``).

    Inside a ``checkify.checkify``-transformed function it records an error that
    ``err.throw()`` raises; anywhere else (plain ``jit``, eager) it does nothing.

    Args:
        pred: a boolean scalar (may be traced): the condition that must hold.
        msg: the error message, a format string (``{}`` fields take ``fmt_args`` and
            ``fmt_kwargs``, which may be traced).
        *fmt_args: positional values formatted into ``msg``.
        **fmt_kwargs: keyword values formatted into ``msg``.
    """
    checkify.debug_check(pred, msg, *fmt_args, **fmt_kwargs)


def is_concrete(x) -> bool:
    """Whether values can be checked eagerly.

    Args:
        x: an array, possibly traced.

    Returns:
        True when ``x`` holds concrete values (it is not a tracer).
    """
    return not isinstance(x, jax.core.Tracer)
