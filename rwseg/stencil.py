"""Sparse pixel affinities on a fixed stencil of neighbour offsets.

Every rwseg method works on an affinity *on a stencil*: a tuple of K offsets
``o_k = (dy, dx)`` and an ``(H, W, K)`` array whose entry ``[i, k]`` links pixel ``i``
to pixel ``i + o_k`` (``../shared/docs/methods.md``, notation). Entries that point
outside the image are ignored everywhere.

Memory of every function here is O(H·W·K·C) (``gather``) or O(H·W·C) (``apply``,
``apply_transpose``), never O((H·W)^2) — except :func:`to_dense`, which exists for tests
and notebooks on small maps.

Offsets are static Python data (a tuple of ``(int, int)``), so they can be closed over
or passed as static arguments of ``jax.jit``. All array functions take one image,
channels last, and batch with ``jax.vmap``; they are differentiable in every
floating-point argument.
"""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import jax.numpy as jnp
import numpy as np

from rwseg import _validate as V

Offset = tuple[int, int]
Offsets = tuple[Offset, ...]
Rate = Union[int, tuple[int, int]]

__all__ = [
    "Offsets",
    "as_offsets",
    "disk_offsets",
    "dilated_offsets",
    "four_connected",
    "shift",
    "gather",
    "valid_mask",
    "apply",
    "apply_transpose",
    "degree",
    "to_dense",
    "label_affinity",
]


# --------------------------------------------------------------------------- offsets


def as_offsets(offsets: Iterable[Sequence[int]], name: str = "offsets") -> Offsets:
    """Normalise ``offsets`` to a hashable tuple of ``(dy, dx)`` int pairs.

    Raises ``ValueError`` for an empty stencil, pairs of the wrong length, or (0, 0)
    (a pixel is never its own neighbour).
    """
    try:
        pairs = [tuple(o) for o in offsets]
    except TypeError as e:
        raise TypeError(f"{name}: expected a sequence of (dy, dx) int pairs, got {offsets!r}") from e
    for o in pairs:
        if len(o) != 2:
            raise ValueError(f"{name}: expected (dy, dx) pairs, got an entry {o!r} of length {len(o)}")
    result = tuple((int(dy), int(dx)) for dy, dx in pairs)
    if not result:
        raise ValueError(f"{name}: expected at least one (dy, dx) offset, got an empty stencil")
    if (0, 0) in result:
        raise ValueError(f"{name}: (0, 0) is not a neighbour offset; got {result}")
    return result


def disk_offsets(radius: int) -> Offsets:
    """Every (dy, dx) with ``0 < dy² + dx² <= radius²``, sorted by (dy, dx).

    RWN's stencil (seed 000, §3.2: pixel pairs "within radius R"; R = 5 at test time,
    R = 40 in training). ``disk_offsets(1)`` is the 4-connected stencil.
    """
    radius = V.check_nonnegative_int("radius", radius)
    r2 = radius * radius
    return tuple(
        (dy, dx)
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
        if 0 < dy * dy + dx * dx <= r2
    )


def dilated_offsets(rates: Sequence[Rate]) -> Offsets:
    """The 8 neighbours of each dilation rate, in order (seed 004, §3.1).

    An int ``r`` means ``(r, r)``; a pair ``(r1, r2)`` is used as given. For each rate
    the 8 offsets of ``{-r1, 0, r1} x {-r2, 0, r2}`` without (0, 0), row-major. The
    result has ``8 * len(rates)`` offsets; channel ``c`` of a dilated-affinity head is
    offset ``c`` here.
    """
    if isinstance(rates, (int, np.integer)):
        raise TypeError(f"rates: expected a sequence of rates like (8, 16), got the single int {rates}")
    out = []
    for rate in rates:
        if isinstance(rate, (int, np.integer)) and not isinstance(rate, bool):
            r1 = r2 = int(rate)
        elif isinstance(rate, Sequence) and len(rate) == 2:
            r1, r2 = int(rate[0]), int(rate[1])
        else:
            raise TypeError(f"rates: expected each rate to be an int or an (r1, r2) pair, got {rate!r}")
        if r1 <= 0 or r2 <= 0:
            raise ValueError(f"rates: expected every rate > 0, got {rate!r} in {tuple(rates)!r}")
        out.extend((sy * r1, sx * r2) for sy in (-1, 0, 1) for sx in (-1, 0, 1) if (sy, sx) != (0, 0))
    if not out:
        raise ValueError("rates: expected at least one rate, got an empty sequence")
    return tuple(out)


def four_connected() -> Offsets:
    """The 4-connected stencil ``((-1, 0), (0, -1), (0, 1), (1, 0))`` (RAWKS, seed 001)."""
    return ((-1, 0), (0, -1), (0, 1), (1, 0))


# --------------------------------------------------------------------------- shifting


def _halo(offsets: Offsets) -> tuple[int, int]:
    return max(abs(dy) for dy, _ in offsets), max(abs(dx) for _, dx in offsets)


def _pad(x, halo):
    py, px = halo
    return jnp.pad(x, ((py, py), (px, px)) + ((0, 0),) * (x.ndim - 2))


def _window(xp, halo, shape, offset):
    (py, px), (h, w), (dy, dx) = halo, shape, offset
    return xp[py + dy : py + dy + h, px + dx : px + dx + w]


def shift(x, offset: Offset):
    """``out[i] = x[i + offset]``, zero where ``i + offset`` is outside the image.

    x: (H, W, ...) -> (H, W, ...).
    """
    offsets = as_offsets([offset], "offset")
    halo = _halo(offsets)
    return _window(_pad(x, halo), halo, x.shape[:2], offsets[0])


def _check_map(name, x, layout="(H, W, C)"):
    V.check_rank(name, x, 3, layout)
    V.check_floating(name, x)


def _check_weights(weights, x_shape, offsets):
    V.check_rank("weights", weights, 3, "(H, W, K)")
    V.check_floating("weights", weights)
    h, w = x_shape[:2]
    V.check_shape("weights", weights, (h, w, len(offsets)), f"(H, W, K) with K = len(offsets) = {len(offsets)}")


def gather(x, offsets) -> jnp.ndarray:
    """Neighbour values: ``out[i, k] = x[i + o_k]``, zero outside the image.

    x: (H, W, C) -> (H, W, K, C). Memory O(H·W·K·C).
    """
    offsets = as_offsets(offsets)
    V.check_rank("x", x, 3, "(H, W, C)")
    halo = _halo(offsets)
    xp = _pad(x, halo)
    return jnp.stack([_window(xp, halo, x.shape[:2], o) for o in offsets], axis=2)


def valid_mask(height: int, width: int, offsets) -> np.ndarray:
    """(H, W, K) bool: True where ``i + o_k`` lies inside the ``height x width`` image.

    Computed with numpy from static sizes, so it is a constant under ``jit``.
    """
    offsets = as_offsets(offsets)
    height = V.check_nonnegative_int("height", height, positive=True)
    width = V.check_nonnegative_int("width", width, positive=True)
    ys = np.arange(height)[:, None, None]
    xs = np.arange(width)[None, :, None]
    dy = np.array([o[0] for o in offsets])[None, None, :]
    dx = np.array([o[1] for o in offsets])[None, None, :]
    return (ys + dy >= 0) & (ys + dy < height) & (xs + dx >= 0) & (xs + dx < width)


# --------------------------------------------------------------------------- operators


def apply(weights, x, offsets) -> jnp.ndarray:
    """Sparse matrix-vector product on the stencil: ``y[i] = sum_k weights[i, k] x[i + o_k]``.

    weights: (H, W, K); x: (H, W, C) -> y: (H, W, C). Entries pointing outside the image
    are ignored. This is ``to_dense(weights, offsets) @ x.reshape(H*W, C)`` without the
    matrix: one pass over the K shifted copies, memory O(H·W·C).
    """
    offsets = as_offsets(offsets)
    _check_map("x", x)
    _check_weights(weights, x.shape, offsets)
    halo = _halo(offsets)
    xp = _pad(x, halo)
    y = jnp.zeros(x.shape, jnp.result_type(weights, x))
    for k, o in enumerate(offsets):
        y = y + weights[:, :, k, None] * _window(xp, halo, x.shape[:2], o)
    return y


def apply_transpose(weights, x, offsets) -> jnp.ndarray:
    """The exact adjoint of :func:`apply`: ``y[j] = sum_k weights[j - o_k, k] x[j - o_k]``.

    weights: (H, W, K); x: (H, W, C) -> (H, W, C). Equals
    ``to_dense(weights, offsets).T @ x.reshape(H*W, C)``; memory O(H·W·C).
    """
    offsets = as_offsets(offsets)
    _check_map("x", x)
    _check_weights(weights, x.shape, offsets)
    halo = _halo(offsets)
    xp, wp = _pad(x, halo), _pad(weights, halo)
    y = jnp.zeros(x.shape, jnp.result_type(weights, x))
    # Both windows read pixel j - o_k. A source pixel i = j - o_k whose neighbour i + o_k
    # is outside can only pair with an outside j, so invalid entries never contribute.
    for k, (dy, dx) in enumerate(offsets):
        src = (-dy, -dx)
        y = y + _window(wp, halo, x.shape[:2], src)[:, :, k, None] * _window(xp, halo, x.shape[:2], src)
    return y


def degree(weights, offsets) -> jnp.ndarray:
    """Row sums over valid entries: ``d[i] = sum_k weights[i, k] [i + o_k inside]``.

    weights: (H, W, K) -> (H, W). The ``D`` of ``A = D^-1 W`` (RWN, methods.md §1).
    """
    offsets = as_offsets(offsets)
    V.check_rank("weights", weights, 3, "(H, W, K)")
    h, w, _ = weights.shape
    V.check_shape("weights", weights, (h, w, len(offsets)), f"(H, W, K) with K = len(offsets) = {len(offsets)}")
    return jnp.sum(jnp.where(valid_mask(h, w, offsets), weights, 0), axis=-1)


def to_dense(weights, offsets) -> jnp.ndarray:
    """The (H·W, H·W) matrix of :func:`apply`, row-major pixel order.

    ``M[i, i + o_k] += weights[i, k]`` for valid entries. O((H·W)^2) memory: for tests,
    oracles and notebooks on small maps only.
    """
    offsets = as_offsets(offsets)
    V.check_rank("weights", weights, 3, "(H, W, K)")
    h, w, k = weights.shape
    V.check_shape("weights", weights, (h, w, len(offsets)), f"(H, W, K) with K = len(offsets) = {len(offsets)}")
    valid = valid_mask(h, w, offsets)
    ys, xs, ks = np.nonzero(valid)
    rows = ys * w + xs
    cols = (ys + np.array([o[0] for o in offsets])[ks]) * w + xs + np.array([o[1] for o in offsets])[ks]
    dense = jnp.zeros((h * w, h * w), weights.dtype)
    return dense.at[rows, cols].add(weights[ys, xs, ks])


def label_affinity(labels, offsets, ignore_index: int = 255):
    """Ground-truth affinities on the stencil (RWN §3.3, dilated affinity §3.1).

    labels: (H, W) int -> ``(targets, valid)``, both (H, W, K): ``targets`` is 1.0 where
    pixel ``i`` and ``i + o_k`` share a label, else 0.0 (float32); ``valid`` is False
    where either label is negative or ``ignore_index``, or the neighbour is outside.
    """
    offsets = as_offsets(offsets)
    V.check_rank("labels", labels, 2, "(H, W)")
    V.check_integer("labels", labels)
    labels = jnp.asarray(labels)
    h, w = labels.shape
    ok = (labels >= 0) & (labels != ignore_index)
    nbr = gather(labels[:, :, None], offsets)[..., 0]
    nbr_ok = gather(ok[:, :, None], offsets)[..., 0]
    valid = ok[:, :, None] & nbr_ok & valid_mask(h, w, offsets)
    targets = (labels[:, :, None] == nbr).astype(jnp.float32)
    return jnp.where(valid, targets, 0.0), valid
