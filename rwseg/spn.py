"""Spatial propagation network: linear row/column recurrences.

Liu, De Mello, Gu, Zhong, Yang & Kautz, *Learning Affinity via Spatial Propagation
Networks* (NIPS 2017); "the paper" below. Math: ``docs/methods.md`` §3.

One propagation scans the image column by column (or row by row). For
``"left_to_right"`` (paper eq. 1 one-way, eq. 5 three-way)::

    h[i, t] = (1 - sum_k p[i, t, c, k]) * x[i, t] + sum_k p[i, t, c, k] * h[i + d_k, t - 1]

elementwise per channel ``c``, with ``d = (-1, 0, +1)`` for gate ``k = 0, 1, 2``
(three-way) or ``d = (0,)`` (one-way). Gates belong to the pixel being computed. A gate
whose neighbour ``(i + d_k, t - 1)`` lies outside the image counts as zero in *both*
sums, so ``h[:, 0] = x[:, 0]`` and every output is an affine combination of inputs whose
weights sum to one (Theorem 1: a constant map is a fixed point). The other directions
are the same recurrence on a flipped / transposed image:

=================  ==========================  ===========================
direction          scan axis, order            neighbour of (row, col)
=================  ==========================  ===========================
left_to_right      columns, 0 -> W-1           (row + d_k, col - 1)
right_to_left      columns, W-1 -> 0           (row + d_k, col + 1)
top_to_bottom      rows, 0 -> H-1              (row - 1, col + d_k)
bottom_to_top      rows, H-1 -> 0              (row + 1, col + d_k)
=================  ==========================  ===========================

The whole propagation is linear in ``x``: ``vec(h) = G vec(x)`` per channel with
``G = (I - A)^-1 D`` (``A`` the stencil matrix of the gates on the offsets above, ``D``
the diagonal ``1 - sum_k p``); :func:`propagation_matrix` builds ``G`` for small maps.

Implementation: every direction is mapped to scan-major ("time-major") order and all
directions of one call are stacked into ONE system of ``T = max(H, W)`` steps over a
column of ``D * max(H, W)`` rows (each direction a row segment; padded rows and steps carry
zero input and zero gates, so H != W needs no second scan). Gates pointing outside their
own image and the input term ``(1 - sum_k p_k) * x`` are computed once, outside the loop.
The recurrence ``h_t = a_t + P_t h_{t-1}`` is solved by :mod:`rwseg.spn_pallas`: a
``lax.scan`` carrying one column (CPU) or a Pallas kernel (TPU; on GPU its Triton variant
when it lowers; interpret mode on request; ``implementation="auto"`` uses a kernel only where it is
verified, :mod:`rwseg.spn_verify`), wrapped in ``lax.custom_linear_solve`` as the triangular system
``(I - A) h = a``: gradients w.r.t. ``x`` run the adjoint recurrence (the reverse scan
with transposed gates) instead of storing per-step intermediates, gradients w.r.t. the
gates are ``lambda * h_prev`` neighbours, and forward mode (``jvp``, ``jacfwd``) works as
well. Everything batches with ``jax.vmap`` and keeps the input dtype.

No value checks are needed: every finite input is valid. Gates with
``sum_k |p_k| > 1`` are allowed but may blow up over long scans; :func:`stabilize`
rescales them (Theorem 3).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rwseg import _platform
from rwseg import _validate as V
from rwseg import spn_pallas, spn_verify, stencil

__all__ = ["DIRECTIONS", "direction_offsets", "propagate", "spn", "stabilize", "propagation_matrix"]

DIRECTIONS = ("left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top")
_ROW_STEPS = spn_pallas.ROW_STEPS  # d_k for gate k, one-way and three-way
_MERGES = ("max", "mean")
_IMPLEMENTATIONS = ("auto", "scan", "pallas")


# --------------------------------------------------------------------------- checks


def _check_direction(direction) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    return direction


def _check_gates(gates, x_shape, name="gates", lead=()):
    """gates: lead + (H, W, C, G) with G in {1, 3} and (H, W, C) = x_shape."""
    layout = "(" + ", ".join(("D",) * len(lead) + ("H", "W", "C", "G")) + ")"
    V.check_rank(name, gates, len(lead) + 4, layout)
    V.check_floating(name, gates)
    g = gates.shape[-1]
    if g not in _ROW_STEPS:
        raise ValueError(
            f"{name}: expected the last axis (gates per pixel) to be 1 (one-way) or 3 (three-way), "
            f"got {g} in shape {tuple(gates.shape)}"
        )
    V.check_shape(name, gates, tuple(lead) + tuple(x_shape) + (g,), f"{layout} matching x (H, W, C)")


def _check_x(x):
    V.check_rank("x", x, 3, "(H, W, C)")
    V.check_floating("x", x)


# --------------------------------------------------------------------------- geometry


def direction_offsets(direction: str, num_gates: int) -> stencil.Offsets:
    """The stencil offsets ``(dy, dx)`` of gate ``k`` in ``direction``.

    Gate ``k`` of pixel ``i`` multiplies ``h[i + offset_k]`` (see the module table); e.g.
    ``direction_offsets("left_to_right", 3) == ((-1, -1), (0, -1), (1, -1))``.

    Args:
        direction: one of :data:`DIRECTIONS`.
        num_gates: 1 (one-way, paper eq. 1) or 3 (three-way, paper eq. 5).

    Returns:
        ``num_gates`` offsets, a tuple of ``(dy, dx)`` pairs.
    """
    _check_direction(direction)
    if num_gates not in _ROW_STEPS:
        raise ValueError(f"num_gates: expected 1 (one-way) or 3 (three-way), got {num_gates!r}")
    ds = _ROW_STEPS[num_gates]
    return {
        "left_to_right": tuple((d, -1) for d in ds),
        "right_to_left": tuple((d, 1) for d in ds),
        "top_to_bottom": tuple((-1, d) for d in ds),
        "bottom_to_top": tuple((1, d) for d in ds),
    }[direction]


# --------------------------------------------------------------------------- layout
#
# All directions of one call share ONE time-major system. Direction d is mapped so that
# its scan runs along the leading axis ("time-major", (T_d, L_d, ...)): left_to_right
# is x.swapaxes(0, 1), top_to_bottom is x itself, the reversed directions flip the time
# axis. Their columns are stacked along the row axis into one column of R rows (each
# direction a segment of ``rows`` rows starting at its offset) and padded in time to
# T = max T_d steps, so H != W needs no second scan: padded rows and steps carry x = 0
# and p = 0 and are dropped afterwards. Gates that point outside their own image (first
# step, first/last row of the segment) are zeroed once here, which also decouples the
# segments from each other.


def _time_major(a, direction):
    """(H, W, ...) -> (T, L, ...): scan axis first, scan order ascending."""
    if direction in ("left_to_right", "right_to_left"):
        a = jnp.swapaxes(a, 0, 1)
    if direction in ("right_to_left", "bottom_to_top"):
        a = jnp.flip(a, axis=0)
    return a


def _from_time_major(a, direction):
    """Inverse of :func:`_time_major`."""
    if direction in ("right_to_left", "bottom_to_top"):
        a = jnp.flip(a, axis=0)
    if direction in ("left_to_right", "right_to_left"):
        a = jnp.swapaxes(a, 0, 1)
    return a


class _Layout(NamedTuple):
    """Where each direction lives in the stacked (T, R, C) system."""

    directions: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...]  # (T_d, L_d) per direction
    steps: int  # T
    rows: int  # segment height (>= every L_d)


def _layout(height, width, directions) -> _Layout:
    sizes = tuple((width, height) if d in ("left_to_right", "right_to_left") else (height, width) for d in directions)
    steps = max(t for t, _ in sizes)
    rows = max(l for _, l in sizes)
    return _Layout(tuple(directions), sizes, steps, rows)


def _gate_mask(steps, rows, num_gates) -> np.ndarray:
    """(T, L, 1, G) bool: gate k of (t, i) has its neighbour (t - 1, i + d_k) in the segment."""
    t = np.arange(steps)[:, None, None, None]
    i = np.arange(rows)[None, :, None, None]
    d = np.array(_ROW_STEPS[num_gates])[None, None, None, :]
    return (t >= 1) & (i + d >= 0) & (i + d < rows)


def _pack(x, gates, layout: _Layout):
    """x (H, W, C), gates (D, H, W, C, G) -> a (T, R, C), p (T, G, R, C), masked.

    ``a = (1 - sum_k p_k) * x`` is the input term of the recurrence, computed once here.
    Each gate is split off before the transposes (a minor axis of size G transposes
    slowly on CPU) and every piece is built directly in its stacked place.
    """
    zero = jnp.zeros((), gates.dtype)
    num_gates = gates.shape[-1]

    def place(a, i):  # (T_d, L_d, C) -> (T, rows, C), zero padded
        steps, rows = layout.sizes[i]
        if (steps, rows) == (layout.steps, layout.rows):
            return a
        return jnp.pad(a, ((0, layout.steps - steps), (0, layout.rows - rows), (0, 0)))

    parts_a, parts_p = [], [[] for _ in range(num_gates)]
    # lax.unstack (not indexing): its transpose is one stack, not one pad per piece.
    pieces = [jax.lax.unstack(g, axis=-1) for g in jax.lax.unstack(gates, axis=0)]
    for i, d in enumerate(layout.directions):
        steps, rows = layout.sizes[i]
        mask = _gate_mask(steps, rows, num_gates)  # (T_d, L_d, 1, G)
        pd = [jnp.where(mask[..., k], _time_major(pieces[i][k], d), zero) for k in range(num_gates)]
        parts_a.append(place((1 - sum(pd)) * _time_major(x, d), i))
        for k in range(num_gates):
            parts_p[k].append(place(pd[k], i))
    a = jnp.concatenate(parts_a, axis=1)
    p = jnp.stack([jnp.concatenate(parts, axis=1) for parts in parts_p], axis=1)
    return a, p


def _unpack(h, layout: _Layout):
    """(T, R, C) -> one (H, W, C) map per direction."""
    outs = []
    for i, d in enumerate(layout.directions):
        steps, rows = layout.sizes[i]
        lo = i * layout.rows
        outs.append(_from_time_major(h[:steps, lo : lo + rows], d))
    return outs


# --------------------------------------------------------------------------- the solve


def _resolve_implementation(implementation, x, gates, directions):
    """"scan", "pallas" (block kernel: TPU, or interpret mode on CPU) or "pallas_gpu" for this call.

    See :func:`propagate`. On GPU, "pallas" is the Triton kernel
    (:func:`spn_pallas.recurrence_gpu`). "auto" picks a kernel only where it is verified on
    this device (:func:`rwseg.spn_verify.is_verified`: recorded, or the opt-in self-check)
    and, on GPU, it lowers (and compiles) for this shape (:func:`spn_pallas.gpu_kernel_lowers`),
    on TPU its blocks fit on chip; else the scan.
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {_IMPLEMENTATIONS}, got {implementation!r}")
    backend = _platform.platform()  # the target of an ahead-of-time compile (rwseg plan), else the local backend
    on_gpu = backend in ("gpu", "cuda", "rocm")
    if implementation == "pallas":
        return "pallas_gpu" if on_gpu else "pallas"
    if implementation == "auto":
        height, width, channels = x.shape
        n = max(height, width)
        dtype = jnp.result_type(x, gates)
        if on_gpu:
            if not spn_verify.is_verified("pallas_gpu"):
                return "scan"
            layout = _layout(height, width, directions)
            lowers = spn_pallas.gpu_kernel_lowers(layout.steps, len(directions) * layout.rows, channels,
                                                  gates.shape[-1], jnp.dtype(dtype).name, layout.rows)
            return "pallas_gpu" if lowers else "scan"
        if backend != "tpu":
            return "scan"
        on_chip = spn_pallas.fits_on_chip(n, n, channels, gates.shape[-1], dtype.itemsize)
        return "pallas" if on_chip and spn_verify.is_verified("pallas") else "scan"
    return implementation


def _recurrence(b, p, transpose, implementation, segment_rows, interpret):
    """Run the stacked recurrence (or its transpose) on right-hand side b (T, R, C).

    interpret: run a Pallas kernel in interpret mode (decided outside the jit, from the
    backend, so that it is part of the jit's static arguments).
    """
    if implementation == "pallas":
        return spn_pallas.recurrence(b, p, transpose=transpose, segment_rows=segment_rows, interpret=interpret)
    if implementation == "pallas_gpu":
        return spn_pallas.recurrence_gpu(b, p, transpose=transpose, segment_rows=segment_rows, interpret=interpret)
    return spn_pallas.scan_recurrence(b, p, transpose=transpose)


def _solve(a, p, implementation, segment_rows, interpret):
    """h with ``h_t = a_t + P_t h_{t-1}`` (h_{-1} = 0), i.e. ``(I - A) h = a``.

    a: (T, R, C); p: (T, G, R, C), already masked. A ``lax.custom_linear_solve``: the
    forward solve is one scan, derivatives w.r.t. ``a`` use the transposed solve (the
    reverse scan with transposed gates, no per-step residuals), derivatives w.r.t. the
    gates come from the matrix-vector product ``(I - A) h`` at the solution (cotangent of
    ``p_k[t, i]`` = ``lambda[t, i] * h[t - 1, i + d_k]``). Forward mode works too.
    """
    steps = _ROW_STEPS[p.shape[1]]

    def matvec(h):  # (I - A) h; lax.unstack so that the gate cotangent is one stack, not G pads
        prev = spn_pallas.shift_rows(h, -1, axis=0)  # h_{t-1}, zero at t = 0
        gates = jax.lax.unstack(p, axis=1)
        return h - sum(gates[k] * spn_pallas.shift_rows(prev, d, axis=1) for k, d in enumerate(steps))

    def solve(_, rhs):
        return _recurrence(rhs, p, False, implementation, segment_rows, interpret)

    def transpose_solve(_, rhs):
        return _recurrence(rhs, p, True, implementation, segment_rows, interpret)

    return jax.lax.custom_linear_solve(matvec, a, solve, transpose_solve)


def _propagate_stacked(x, gates, directions, implementation):
    """x (H, W, C), gates (D, H, W, C, G) -> list of D maps (H, W, C), one solve for all."""
    directions = tuple(directions)
    implementation = _resolve_implementation(implementation, x, gates, directions)
    return _propagate_stacked_jit(x, gates, directions, implementation, _platform.platform() == "cpu")


@functools.partial(jax.jit, static_argnums=(2, 3, 4))  # compiled once per shape, also when called eagerly
def _propagate_stacked_jit(x, gates, directions, implementation, interpret):
    dtype = jnp.result_type(x, gates)
    x, gates = x.astype(dtype), gates.astype(dtype)
    layout = _layout(x.shape[0], x.shape[1], directions)
    a, p = _pack(x, gates, layout)
    return _unpack(_solve(a, p, implementation, layout.rows, interpret), layout)


spn_verify.register_propagation(_propagate_stacked_jit, DIRECTIONS)  # the device check compares in it


def propagate(x, gates, *, direction: str, implementation: str = "auto"):
    """One linear propagation of ``x`` in ``direction`` (paper eq. 1 / eq. 5).

    Gates pointing outside the image count as zero in both sums (so the first column/row
    is copied from ``x``). Differentiable in ``x`` and ``gates`` in both modes: the scan is
    a ``lax.custom_linear_solve`` whose backward pass is the adjoint (reverse) recurrence.

    Args:
        x: (H, W, C) float input.
        gates: (H, W, C, 3) three-way or (H, W, C, 1) one-way float gates, gate ``k`` of
            pixel ``i`` weighting the neighbour ``i + direction_offsets(direction, G)[k]`` of
            the previous column/row.
        direction: one of :data:`DIRECTIONS`.
        implementation: ``"scan"`` (``lax.scan``), ``"pallas"`` (the Pallas kernel of
            :mod:`rwseg.spn_pallas`, its Triton variant on GPU; interpret mode on CPU;
            forced, verified or not) or ``"auto"``: the kernel only where it is verified on
            this device (:mod:`rwseg.spn_verify`: none is recorded yet, so the scan unless
            the opt-in self-check passes) and, on TPU, its blocks fit on chip, on GPU it
            lowers; else the scan; the scan on CPU.

    Returns:
        h: (H, W, C) in ``result_type(x, gates)``.
    """
    _check_direction(direction)
    _check_x(x)
    _check_gates(gates, x.shape)
    return _propagate_stacked(x, gates[None], (direction,), implementation)[0]


def spn(x, gates, *, merge: str = "max", implementation: str = "auto"):
    """Four-direction SPN layer: propagate in every direction, merge node-wise (paper §3.3).

    Equals ``max_d propagate(x, gates[d], direction=DIRECTIONS[d])``; the four directions
    run as one stacked recurrence (any H, W) and one adjoint recurrence in the backward
    pass.

    Args:
        x: (H, W, C) float input.
        gates: (4, H, W, C, G) float, G in {1, 3}, in the order of :data:`DIRECTIONS`
            (left_to_right, right_to_left, top_to_bottom, bottom_to_top).
        merge: ``"max"`` (the paper's node-wise max pooling; its gradient goes to the
            direction that attains the max) or ``"mean"``.
        implementation: as for :func:`propagate`.

    Returns:
        (H, W, C) in ``result_type(x, gates)``.
    """
    _check_x(x)
    _check_gates(gates, x.shape, lead=(4,))
    if gates.shape[0] != 4:
        raise ValueError(f"gates: expected 4 directions on the first axis {DIRECTIONS}, got {gates.shape[0]}")
    if merge not in _MERGES:
        raise ValueError(f"merge: expected one of {_MERGES}, got {merge!r}")
    outs = _propagate_stacked(x, gates, DIRECTIONS, implementation)
    if merge == "mean":
        return sum(outs) / len(outs)
    # Pairwise elementwise maxima: their gradient is a select (cotangent to the direction
    # attaining the max, split evenly on exact ties), fused, unlike reduce_max's.
    return jnp.maximum(jnp.maximum(outs[0], outs[1]), jnp.maximum(outs[2], outs[3]))


def stabilize(gates):
    """Rescale gates so that ``sum_k |p_k| <= 1`` per pixel and channel (paper Theorem 3).

    ``p / max(1, sum_k |p_k|)``: gates that already satisfy the bound are returned
    unchanged; differentiable everywhere except where a gate is exactly 0 or the sum is
    exactly 1 (subgradients, as for ``abs``).

    Args:
        gates: (..., G) float, the gate axis last.

    Returns:
        Same shape and dtype as ``gates``.
    """
    V.check_floating("gates", gates)
    if jnp.ndim(gates) < 1:
        raise ValueError(f"gates: expected an array (..., G) with a gate axis last, got shape {jnp.shape(gates)}")
    total = jnp.sum(jnp.abs(gates), axis=-1, keepdims=True)
    return gates / jnp.maximum(total, jnp.ones((), total.dtype))


def propagation_matrix(gates, *, direction: str, channel: int = 0):
    """The dense (H·W, H·W) propagation matrix ``G`` of one channel: ``vec(h) = G vec(x)``.

    Row-major pixel order, so row ``i`` of ``G`` is the learned affinity of pixel ``i``
    (what the paper visualises). Built in closed form ``G = (I - A)^-1 D`` with
    ``A = stencil.to_dense(p, direction_offsets(direction, G))`` and
    ``D = diag(1 - sum_k p_k)`` over in-image gates, independently of the scan in
    :func:`propagate`. O((H·W)^2) memory: small maps only.

    Args:
        gates: (H, W, C, G) float, as for :func:`propagate`.
        direction: one of :data:`DIRECTIONS`.
        channel: which channel's gates.

    Returns:
        (H·W, H·W) in the dtype of ``gates``.
    """
    _check_direction(direction)
    V.check_rank("gates", gates, 4, "(H, W, C, G)")
    V.check_floating("gates", gates)
    h, w, c, g = gates.shape
    if g not in _ROW_STEPS:
        raise ValueError(f"gates: expected the last axis to be 1 or 3, got {g} in shape {tuple(gates.shape)}")
    channel = V.check_nonnegative_int("channel", channel)
    if channel >= c:
        raise ValueError(f"channel: expected an index < C = {c}, got {channel}")
    offsets = direction_offsets(direction, g)
    p = jnp.where(stencil.valid_mask(h, w, offsets), gates[:, :, channel, :], jnp.zeros((), gates.dtype))
    a = stencil.to_dense(p, offsets)
    d = (1 - jnp.sum(p, axis=-1)).reshape(-1)
    # I - A is triangular only in scan-major order, not row-major: use a general solve.
    return jnp.linalg.solve(jnp.eye(h * w, dtype=gates.dtype) - a, jnp.diag(d))
