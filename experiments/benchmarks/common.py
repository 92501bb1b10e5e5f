"""Shared benchmark helpers: timing, machine description, markdown tables.

Every benchmark in this folder measures rwseg and its peers *in the same run* and prints
one markdown table (medians over repeats, and ratios). Run from the repo root, e.g.
``python experiments/benchmarks/bench_stencil.py``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Sequence

import jax


def block(x):
    """Wait for every JAX array in ``x`` (a pytree) to be computed."""
    return jax.block_until_ready(x)


def median_time(fn: Callable[[], object], *, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time in seconds of ``fn()`` (which must block until its result is ready).

    ``warmup`` calls run first (and absorb jit compilation).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    """One line naming the machine: CPU model, cores, jax backend and devices."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (
        f"{cpu}; {os.cpu_count()} cores; python {platform.python_version()}; "
        f"jax {jax.__version__} on {jax.default_backend()} ({devices})"
    )


def gpu_device():
    """The first GPU jax sees, or None."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    return gpus[0] if gpus else None


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render rows as a GitHub markdown table."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def median_times(fns: Sequence[Callable[[], object]], *, repeats: int = 10, warmup: int = 2) -> list[float]:
    """Median wall times in seconds of several blocking callables, measured interleaved.

    Each round calls every function once, in turn, so slow drifts of a shared machine
    hit all of them alike and their ratios stay meaningful.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]
