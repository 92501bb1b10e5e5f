"""Spatial propagation network: linear row/column recurrences (seed 002, Liu et al. 2017).

One propagation scans the image column by column (or row by row). For
``"left_to_right"`` (seed 002, eq. 1 one-way, eq. 5 three-way)::

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

Implementation: one ``jax.lax.scan`` over the scan axis whose carry is the previous
column ``(H, C)``; the neighbours in rows ``i +- 1`` come from :func:`rwseg.stencil.shift`
and :func:`rwseg.stencil.valid_mask` on that column. Everything is differentiable in ``x``
and ``gates`` (reverse mode through the scan), batches with ``jax.vmap`` and keeps the
input dtype. :func:`spn` runs the four directions of one image as a single vmapped scan
when the image is square (two scans otherwise).

No value checks are needed: every finite input is valid. Gates with
``sum_k |p_k| > 1`` are allowed but may blow up over long scans; :func:`stabilize`
rescales them (Theorem 3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rwseg import _validate as V
from rwseg import stencil

__all__ = ["DIRECTIONS", "direction_offsets", "propagate", "spn", "stabilize", "propagation_matrix"]

DIRECTIONS = ("left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top")
_ROW_STEPS = {1: (0,), 3: (-1, 0, 1)}  # d_k for gate k, one-way and three-way
_MERGES = ("max", "mean")


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


def _to_canonical(a, direction):
    """Map an (H, W, ...) array so that ``direction`` becomes left-to-right."""
    if direction in ("top_to_bottom", "bottom_to_top"):
        a = jnp.swapaxes(a, 0, 1)
    if direction in ("right_to_left", "bottom_to_top"):
        a = jnp.flip(a, axis=1)
    return a


def _from_canonical(a, direction):
    """Inverse of :func:`_to_canonical`."""
    if direction in ("right_to_left", "bottom_to_top"):
        a = jnp.flip(a, axis=1)
    if direction in ("top_to_bottom", "bottom_to_top"):
        a = jnp.swapaxes(a, 0, 1)
    return a


# --------------------------------------------------------------------------- the scan


@jax.jit  # compiled once per shape/dtype: the scan body is a fresh closure on every call
def _scan_left_to_right(x, gates):
    """Left-to-right propagation of x (H, W, C) with gates (H, W, C, G) -> (H, W, C)."""
    h_size = x.shape[0]
    row_steps = _ROW_STEPS[gates.shape[-1]]
    # valid[i, k]: neighbour row i + d_k inside the image (column t - 1 always exists
    # inside the scan, which starts at t = 1). The stencil forbids the (0, 0) offset,
    # so the same-row neighbour is the previous column itself.
    valid = jnp.stack(
        [jnp.ones((h_size,), bool) if d == 0 else stencil.valid_mask(h_size, 1, [(d, 0)])[:, 0, 0] for d in row_steps],
        axis=-1,
    )[:, None, :]  # (H, 1, G)

    def neighbours(h_prev):  # (H, C) -> (H, C, G): h_prev[i + d_k], zero outside
        cols = [h_prev if d == 0 else stencil.shift(h_prev[:, None], (d, 0))[:, 0] for d in row_steps]
        return jnp.stack(cols, axis=-1)

    def step(h_prev, column):
        x_t, p_t = column  # (H, C), (H, C, G)
        p_t = jnp.where(valid, p_t, jnp.zeros((), p_t.dtype))
        h_t = (1 - jnp.sum(p_t, axis=-1)) * x_t + jnp.sum(p_t * neighbours(h_prev), axis=-1)
        return h_t, h_t

    dtype = jnp.result_type(x, gates)
    x = x.astype(dtype)
    gates = gates.astype(dtype)
    h0 = x[:, 0]
    xs = (jnp.swapaxes(x[:, 1:], 0, 1), jnp.swapaxes(gates[:, 1:], 0, 1))
    _, hs = jax.lax.scan(step, h0, xs)  # (W - 1, H, C)
    return jnp.concatenate([h0[:, None], jnp.swapaxes(hs, 0, 1)], axis=1)


def propagate(x, gates, direction: str):
    """One linear propagation of ``x`` in ``direction`` (seed 002, eq. 1 / eq. 5).

    x: (H, W, C) float; gates: (H, W, C, 3) three-way or (H, W, C, 1) one-way, gate
    ``k`` of pixel ``i`` weighting the neighbour ``i + direction_offsets(direction, G)[k]``
    of the previous column/row; direction: one of :data:`DIRECTIONS`.
    Returns h: (H, W, C), dtype ``result_type(x, gates)``. Gates pointing outside the
    image count as zero in both sums (so the first column/row is copied from ``x``).
    One ``jax.lax.scan`` over the scan axis; differentiable in ``x`` and ``gates``.
    """
    _check_direction(direction)
    _check_x(x)
    _check_gates(gates, x.shape)
    h = _scan_left_to_right(_to_canonical(x, direction), _to_canonical(gates, direction))
    return _from_canonical(h, direction)


def spn(x, gates, merge: str = "max"):
    """Four-direction SPN layer: propagate in every direction, merge node-wise (seed 002, §3.3).

    x: (H, W, C); gates: (4, H, W, C, G), G in {1, 3}, in the order of :data:`DIRECTIONS`
    (left_to_right, right_to_left, top_to_bottom, bottom_to_top); merge: ``"max"`` (the
    paper's node-wise max pooling) or ``"mean"``. Returns (H, W, C).

    Equals ``max_d propagate(x, gates[d], DIRECTIONS[d])``; the directions whose
    canonical (scan-major) shapes agree run as one vmapped scan (all four when H == W).
    """
    _check_x(x)
    _check_gates(gates, x.shape, lead=(4,))
    if gates.shape[0] != 4:
        raise ValueError(f"gates: expected 4 directions on the first axis {DIRECTIONS}, got {gates.shape[0]}")
    if merge not in _MERGES:
        raise ValueError(f"merge: expected one of {_MERGES}, got {merge!r}")
    canon = [(_to_canonical(x, d), _to_canonical(gates[i], d)) for i, d in enumerate(DIRECTIONS)]
    groups: dict[tuple, list[int]] = {}
    for i, (xc, _) in enumerate(canon):
        groups.setdefault(xc.shape, []).append(i)
    outs = [None] * 4
    for idx in groups.values():
        xs = jnp.stack([canon[i][0] for i in idx])
        gs = jnp.stack([canon[i][1] for i in idx])
        hs = jax.vmap(_scan_left_to_right)(xs, gs)
        for j, i in enumerate(idx):
            outs[i] = _from_canonical(hs[j], DIRECTIONS[i])
    stacked = jnp.stack(outs)
    return jnp.max(stacked, axis=0) if merge == "max" else jnp.mean(stacked, axis=0)


def stabilize(gates):
    """Rescale gates so that ``sum_k |p_k| <= 1`` per pixel and channel (seed 002, Theorem 3).

    gates: (..., G) -> same shape and dtype: ``p / max(1, sum_k |p_k|)``. Gates that
    already satisfy the bound are returned unchanged; differentiable everywhere except
    where a gate is exactly 0 or the sum is exactly 1 (subgradients, as for ``abs``).
    """
    V.check_floating("gates", gates)
    if jnp.ndim(gates) < 1:
        raise ValueError(f"gates: expected an array (..., G) with a gate axis last, got shape {jnp.shape(gates)}")
    total = jnp.sum(jnp.abs(gates), axis=-1, keepdims=True)
    return gates / jnp.maximum(total, jnp.ones((), total.dtype))


def propagation_matrix(gates, direction: str, channel: int = 0):
    """The dense (H·W, H·W) propagation matrix ``G`` of one channel: ``vec(h) = G vec(x)``.

    gates: (H, W, C, G) as for :func:`propagate`; channel: which channel's gates.
    Row-major pixel order, so row ``i`` of ``G`` is the learned affinity of pixel ``i``
    (what the paper visualises). Built in closed form ``G = (I - A)^-1 D`` with
    ``A = stencil.to_dense(p, direction_offsets(direction, G))`` and
    ``D = diag(1 - sum_k p_k)`` over in-image gates, independently of the scan in
    :func:`propagate`. O((H·W)^2) memory: small maps only.
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
