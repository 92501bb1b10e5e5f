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

__all__ = ["compile_platform", "platform"]

_PLATFORM: contextvars.ContextVar = contextvars.ContextVar("rwseg_compile_platform", default=None)


@contextlib.contextmanager
def compile_platform(name: str):
    """Within this context :func:`platform` returns ``name`` (e.g. ``"tpu"``)."""
    token = _PLATFORM.set(str(name))
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def platform() -> str:
    """The platform being compiled for: the :func:`compile_platform` in effect, else ``jax.default_backend()``."""
    return _PLATFORM.get() or jax.default_backend()
