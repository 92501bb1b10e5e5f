"""Which SPN Pallas kernel ``implementation="auto"`` may use: verified kernels only.

:mod:`rwseg.spn_pallas` has two kernels besides the ``lax.scan`` recurrence: the block
kernel :func:`~rwseg.spn_pallas.recurrence` (Mosaic, TPU) and its Triton variant
:func:`~rwseg.spn_pallas.recurrence_gpu` (GPU). Both match the scan in interpret mode on
CPU, but a kernel that lowers and compiles for a chip has not thereby been shown to
compute the right numbers there. So ``spn(..., implementation="auto")`` picks a kernel on
a backend only when it has been **verified** on that device kind:

1. **recorded**: the device kind is in :data:`RECORDED` for the kernel: a run of the
   device check (:func:`check_kernel`, ``rwseg check-kernels``) printed "verified" on that
   chip and the result was recorded here, in the package. None is recorded yet, so until
   then ``auto`` means the scan on GPU and on TPU;
2. **self-checked** (opt in): with the environment variable ``RWSEG_SPN_SELF_CHECK=1`` or
   after :func:`set_self_check` ``(True)``, the first ``auto`` call on an accelerator runs
   :func:`check_kernel` once (a few seconds: small maps, forward and gradients, against
   the scan) and caches the result for the process. On a mismatch it warns
   (``RuntimeWarning``, with the difference) and ``auto`` keeps the scan.

``implementation="pallas"`` still forces the kernel, verified or not.

The device check any user can run on their chip::

    rwseg check-kernels              # the kernel of this backend; prints "verified" or the difference
    rwseg check-kernels --interpret  # on CPU: both kernels in Pallas interpret mode

or from Python: ``rwseg.spn_verify.check_kernel()``. Exit status 0: verified; 1: not.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["RECORDED", "KERNELS", "TOLERANCE", "KernelCheck", "kernel_for_backend", "device_kind",
           "check_kernel", "register_propagation", "set_self_check", "self_check_enabled", "is_verified",
           "format_check", "report"]

# kernel (an implementation name of rwseg.spn) -> the backends on which "auto" may choose it
KERNELS = {"pallas": ("tpu",), "pallas_gpu": ("gpu", "cuda", "rocm")}

# kernel -> device kinds (``jax.devices()[0].device_kind``, e.g. "TPU v5 lite", "NVIDIA H100
# 80GB HBM3") on which ``rwseg check-kernels`` printed "verified". Add a device kind only with
# the output of such a run (chip, jax version, date) in the commit message.
RECORDED: dict[str, tuple[str, ...]] = {"pallas": (), "pallas_gpu": ()}

# largest accepted difference, relative to the largest magnitude of the scan's result, per dtype
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}

_ENV = "RWSEG_SPN_SELF_CHECK"
_propagation = None  # (stacked propagation, directions) of rwseg.spn, registered when it is imported
_self_check: bool | None = None  # None: follow the environment variable
_cache: dict = {}  # (kernel, backend, device kind) -> KernelCheck, this process's self-checks


class KernelCheck(NamedTuple):
    """The result of :func:`check_kernel`.

    Attributes:
        kernel: ``"pallas"`` or ``"pallas_gpu"``.
        backend: ``jax.default_backend()`` where it ran.
        device_kind: the device kind where it ran.
        interpret: whether the kernel ran in Pallas interpret mode.
        max_difference: the largest ``|kernel - scan|`` over the checked maps and gradients,
            relative to the largest magnitude of the scan's (NaN if either is not finite).
        tolerance: the accepted ``max_difference`` (:data:`TOLERANCE`).
        verified: ``max_difference <= tolerance``.
    """

    kernel: str
    backend: str
    device_kind: str
    interpret: bool
    max_difference: float
    tolerance: float
    verified: bool


def kernel_for_backend(backend: str) -> str | None:
    """The kernel ``"auto"`` could choose on ``backend`` (``None`` on CPU).

    Args:
        backend: a backend name, e.g. ``jax.default_backend()``.

    Returns:
        ``"pallas"`` (TPU), ``"pallas_gpu"`` (GPU) or ``None``.
    """
    for kernel, backends in KERNELS.items():
        if backend in backends:
            return kernel
    return None


def device_kind() -> str:
    """``jax.devices()[0].device_kind`` of the default backend, e.g. ``"TPU v5 lite"``.

    Returns:
        The device kind string.
    """
    return jax.devices()[0].device_kind


def set_self_check(enabled: bool | None) -> None:
    """Opt in to (``True``) or out of (``False``) the self-check at first use; ``None``: follow
    the environment variable ``RWSEG_SPN_SELF_CHECK`` (the default).

    Args:
        enabled: the setting.
    """
    global _self_check
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected True, False or None, got {enabled!r}")
    _self_check = enabled


def self_check_enabled() -> bool:
    """Whether ``auto`` runs the self-check (see :func:`set_self_check`).

    Returns:
        The setting, else whether ``RWSEG_SPN_SELF_CHECK`` is ``1``/``true``/``yes``.
    """
    if _self_check is not None:
        return _self_check
    return os.environ.get(_ENV, "").strip().lower() in ("1", "true", "yes")


def register_propagation(propagate_stacked, directions) -> None:
    """Register the propagation :func:`check_kernel` compares the kernels in (``rwseg.spn``
    does so when it is imported: it imports this module, which cannot import it back).

    Args:
        propagate_stacked: ``f(x, gates, directions, implementation, interpret)`` -> the maps of
            the ``directions`` (``rwseg.spn``'s jitted stacked propagation).
        directions: all directions, in ``rwseg.spn``'s order.
    """
    global _propagation
    _propagation = (propagate_stacked, tuple(directions))


def _registered():
    """The registered ``(propagate_stacked, directions)``."""
    if _propagation is None:
        raise RuntimeError("rwseg.spn_verify: the check runs rwseg.spn's propagation; import rwseg.spn first")
    return _propagation


def _problems(dtype):
    """Small SPN problems: (x (H, W, C), gates (D, H, W, C, G), cotangents, directions)."""
    _, DIRECTIONS = _registered()
    rng = np.random.default_rng(0)
    out = []
    for (h, w, c), g, directions in (((13, 9, 5), 3, DIRECTIONS), ((6, 11, 3), 1, DIRECTIONS),
                                     ((7, 7, 130), 3, ("top_to_bottom",))):
        x = rng.normal(size=(h, w, c)).astype(dtype)
        raw = rng.normal(scale=0.6, size=(len(directions), h, w, c, g))
        gates = (raw / np.maximum(np.sum(np.abs(raw), -1, keepdims=True), 1)).astype(dtype)  # spn.stabilize
        cot = rng.normal(size=(len(directions), h, w, c)).astype(dtype)
        out.append((x, gates, cot, tuple(directions)))
    return out


def check_kernel(kernel: str | None = None, *, interpret: bool | None = None,
                 dtype: str = "float32") -> KernelCheck:
    """The device check: a Pallas SPN kernel against the ``lax.scan`` recurrence.

    Three small problems (three-way gates on 13x9x5 in all four directions, one-way gates on
    6x11x3, three-way on 7x7x130 in one direction: odd and unequal sizes, several channel
    tiles): the stacked propagation's maps and its vector-Jacobian product with respect to
    the input and the gates (the transposed kernel), each compared with the scan's.

    Args:
        kernel: ``"pallas"`` or ``"pallas_gpu"``; default the kernel of the default backend
            (:func:`kernel_for_backend`), ``"pallas"`` on CPU.
        interpret: run the kernel in Pallas interpret mode; default: on CPU only.
        dtype: ``"float32"`` or ``"float64"``.

    Returns:
        A :class:`KernelCheck`.

    Raises:
        RuntimeError: ``rwseg.spn`` is not imported (:func:`register_propagation`).
    """
    propagate_stacked, _ = _registered()
    backend = jax.default_backend()
    kernel = kernel or kernel_for_backend(backend) or "pallas"
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {tuple(KERNELS)}, got {kernel!r}")
    if dtype not in TOLERANCE:
        raise ValueError(f"dtype: expected one of {tuple(TOLERANCE)}, got {dtype!r}")
    interpret = backend == "cpu" if interpret is None else bool(interpret)

    def value_and_vjp(impl, x, gates, cot, directions):
        def f(x, gates, cot):
            outs, vjp = jax.vjp(lambda a, b: jnp.stack(propagate_stacked(a, b, directions, impl, interpret)),
                                x, gates)
            return (outs,) + vjp(cot)

        # compiled ahead of time and called on numpy arrays: it runs now even when "auto" is
        # first resolved inside someone's jit trace (a plain call would be staged into it)
        return jax.jit(f).lower(x, gates, cot).compile()(x, gates, cot)

    worst = 0.0
    for x, gates, cot, directions in _problems(dtype):
        got = value_and_vjp(kernel, x, gates, cot, directions)
        want = value_and_vjp("scan", x, gates, cot, directions)
        for a, b in zip(got, want):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            scale = np.max(np.abs(b))
            diff = np.max(np.abs(a - b)) / scale if scale > 0 else np.max(np.abs(a - b))
            if not (np.isfinite(diff) and np.all(np.isfinite(a))):
                diff = float("nan")
            worst = float("nan") if np.isnan(diff) or np.isnan(worst) else max(worst, float(diff))
    tol = TOLERANCE[dtype]
    return KernelCheck(kernel=kernel, backend=backend, device_kind=device_kind(), interpret=interpret,
                       max_difference=worst, tolerance=tol, verified=bool(worst <= tol))


def format_check(result: KernelCheck) -> str:
    """One line for a :class:`KernelCheck`: ``... verified`` or ``... NOT verified: max difference ...``.

    Args:
        result: the check.

    Returns:
        The line.
    """
    where = f"{result.kernel} on {result.backend} ({result.device_kind}{', interpret mode' if result.interpret else ''})"
    if result.verified:
        return f"{where}: verified (max relative difference {result.max_difference:.3g} <= {result.tolerance:g})"
    return (f"{where}: NOT verified: max relative difference {result.max_difference:.3g} "
            f"(tolerance {result.tolerance:g})")


def report(kernel: str | None = None, *, interpret: bool | None = None, dtype: str = "float32") -> int:
    """Run :func:`check_kernel` and print its line (``rwseg check-kernels``).

    Args:
        kernel: as for :func:`check_kernel`.
        interpret: as for :func:`check_kernel`.
        dtype: as for :func:`check_kernel`.

    Returns:
        The exit status: 0 when verified, else 1.
    """
    result = check_kernel(kernel, interpret=interpret, dtype=dtype)
    print(format_check(result))
    return 0 if result.verified else 1


def is_verified(kernel: str) -> bool:
    """Whether ``implementation="auto"`` may use ``kernel`` on the default backend.

    True when the backend is one of the kernel's (:data:`KERNELS`) and its device kind is
    :data:`RECORDED` for it, or, with the self-check enabled, when this process's
    :func:`check_kernel` of it passed (run once, then cached; a failure warns once).

    Args:
        kernel: ``"pallas"`` or ``"pallas_gpu"``.

    Returns:
        The decision.
    """
    backend = jax.default_backend()
    if backend not in KERNELS.get(kernel, ()):
        return False
    kind = device_kind()
    if kind in RECORDED.get(kernel, ()):
        return True
    if not self_check_enabled():
        return False
    key = (kernel, backend, kind)
    if key not in _cache:
        try:
            _cache[key] = check_kernel(kernel, interpret=False)
        except Exception as e:  # noqa: BLE001 - a kernel that fails to run is not verified
            _cache[key] = KernelCheck(kernel, backend, kind, False, float("nan"), TOLERANCE["float32"], False)
            warnings.warn(f"rwseg.spn: the self-check of the {kernel} kernel on {kind} failed to run "
                          f"({type(e).__name__}: {e}); implementation='auto' uses the scan", RuntimeWarning,
                          stacklevel=3)
            return False
        if not _cache[key].verified:
            warnings.warn(f"rwseg.spn: {format_check(_cache[key])}; implementation='auto' uses the scan "
                          "(implementation='pallas' forces the kernel)", RuntimeWarning, stacklevel=3)
    return _cache[key].verified
