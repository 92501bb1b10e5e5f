"""The platform a program is being compiled for, when it is not the local backend.

Ahead-of-time compilation for devices this machine does not have (``rwseg plan``
compiles for a TPU topology from a CPU machine) traces on the local backend, so
``jax.default_backend()`` says ``"cpu"`` while the program is for a TPU. Operators
whose implementation depends on the platform (:func:`rwseg.spn.propagate`: the Mosaic
kernel on TPU, interpret mode on CPU) ask :func:`platform` instead, which the planner
sets with :func:`compile_platform` while it traces.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

__all__ = ["compile_platform", "context_value", "platform"]

_PLATFORM: contextvars.ContextVar = contextvars.ContextVar("rwseg_compile_platform", default=None)


@contextlib.contextmanager
def context_value(var: contextvars.ContextVar, value):
    """Within this context ``var`` holds ``value``; the previous value returns on exit (also on error).

    Args:
      var: the context variable.
      value: its value inside the context.

    Returns:
      A context manager (yields nothing).
    """
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def compile_platform(name: str):
    """Within this context :func:`platform` returns ``name`` (e.g. ``"tpu"``).

    Args:
      name: the platform compiled for.

    Returns:
      A context manager (yields nothing).
    """
    return context_value(_PLATFORM, str(name))


def platform() -> str:
    """The platform being compiled for: the :func:`compile_platform` in effect, else ``jax.default_backend()``."""
    return _PLATFORM.get() or jax.default_backend()
