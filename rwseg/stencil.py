"""Sparse pixel affinities on a fixed stencil of neighbour offsets.

Every rwseg method works on an affinity *on a stencil*: a tuple of K offsets
``o_k = (dy, dx)`` and an ``(H, W, K)`` array whose entry ``[i, k]`` links pixel ``i``
to pixel ``i + o_k`` (``docs/methods.md``, notation). Entries that point
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

import functools
from typing import Iterable, Sequence, Union

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching, mlir

from rwseg import _validate as V
from rwseg.constants import IGNORE_INDEX

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
    "mask_weights",
    "apply_masked",
    "apply",
    "apply_transpose",
    "degree",
    "asymmetry",
    "to_dense",
    "label_affinity",
]


# --------------------------------------------------------------------------- offsets


def as_offsets(offsets: Iterable[Sequence[int]], *, name: str = "offsets") -> Offsets:
    """Normalise ``offsets`` to a hashable tuple of ``(dy, dx)`` int pairs.

    Args:
        offsets: an iterable of ``(dy, dx)`` integer pairs.
        name: the argument name used in error messages.

    Returns:
        A tuple of ``(int, int)`` pairs (static data, usable as a ``jit`` static argument).

    Raises:
        ValueError: for an empty stencil, pairs of the wrong length, or (0, 0) (a pixel is
            never its own neighbour).
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

    RWN's stencil (Bertasius et al., *Convolutional Random Walk Networks for Semantic
    Image Segmentation*, §3.2: pixel pairs "within radius R"; R = 5 at test time, R = 40 in
    training). ``disk_offsets(1)`` is the 4-connected stencil.

    Args:
        radius: the disk radius R, an int >= 0.

    Returns:
        The offsets, a tuple of ``(dy, dx)`` pairs.
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
    """The 8 neighbours of each dilation rate, in order (Wu et al., dilated affinity, §3.1).

    An int ``r`` means ``(r, r)``; a pair ``(r1, r2)`` is used as given. For each rate
    the 8 offsets of ``{-r1, 0, r1} x {-r2, 0, r2}`` without (0, 0), row-major; channel
    ``c`` of a dilated-affinity head is offset ``c`` here.

    Args:
        rates: a sequence of rates, each an int > 0 or an ``(r1, r2)`` pair.

    Returns:
        ``8 * len(rates)`` offsets, a tuple of ``(dy, dx)`` pairs.
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
    """The 4-connected stencil (RAWKS, Vernaza & Chandraker, eq. 5-7).

    Returns:
        ``((-1, 0), (0, -1), (0, 1), (1, 0))``.
    """
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

    Args:
        x: (H, W, ...) array.
        offset: one ``(dy, dx)`` pair.

    Returns:
        (H, W, ...) in the dtype of ``x``.
    """
    offsets = as_offsets([offset], name="offset")
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

    Memory O(H·W·K·C).

    Args:
        x: (H, W, C) array.
        offsets: K stencil offsets ``(dy, dx)``.

    Returns:
        (H, W, K, C) in the dtype of ``x``.
    """
    offsets = as_offsets(offsets)
    V.check_rank("x", x, 3, "(H, W, C)")
    halo = _halo(offsets)
    xp = _pad(x, halo)
    return jnp.stack([_window(xp, halo, x.shape[:2], o) for o in offsets], axis=2)


def valid_mask(height: int, width: int, offsets) -> np.ndarray:
    """True where ``i + o_k`` lies inside the ``height x width`` image.

    Computed with numpy from static sizes, so it is a constant under ``jit``.

    Args:
        height: image height H (int > 0).
        width: image width W (int > 0).
        offsets: K stencil offsets ``(dy, dx)``.

    Returns:
        (H, W, K) bool numpy array.
    """
    offsets = as_offsets(offsets)
    height = V.check_nonnegative_int("height", height, positive=True)
    width = V.check_nonnegative_int("width", width, positive=True)
    return _valid(height, width, offsets)


# --------------------------------------------------------------------------- operators
#
# apply, apply_transpose and the weight correlation are the three faces of one bilinear
# map B(w, x) = sum_k w[:, :, k] * shift(x, o_k). Each is a JAX primitive whose jvp is
# bilinear (B(dw, x) + B(w, dx)) and whose transposes are the other two faces:
#
#   apply(w, x)           y[i]    = sum_k w[i, k] x[i + o_k]
#   transpose(w, x)       y[j]    = sum_k w[j - o_k, k] x[j - o_k]
#   correlate(g, x)       d[i, k] = sum_c g[i, c] x[i + o_k, c]          (valid entries)
#
#   apply:      dx = transpose(w, g),  dw = correlate(g, x)
#   transpose:  dx = apply(w, g),      dw = correlate(x, g)
#   correlate:  dg = apply(t, x),      dx = transpose(t, g)
#
# so reverse mode costs two passes of the forward's shape (no K-fold padded maps, no
# stored windows), forward mode and higher orders close over the same three kernels, and
# vmap folds the batch into leading axes (or into the channels when only x is batched).
# Invalid entries (i + o_k outside the image) are masked with ``where``, never multiplied
# by padding, so a NaN or inf weight there cannot leak into the result.

def _valid(height, width, offsets) -> np.ndarray:
    ys = np.arange(height)[:, None, None]
    xs = np.arange(width)[None, :, None]
    dy = np.array([o[0] for o in offsets])[None, None, :]
    dx = np.array([o[1] for o in offsets])[None, None, :]
    return (ys + dy >= 0) & (ys + dy < height) & (xs + dx >= 0) & (xs + dx < width)


def _pad_hw(x, halo):
    """Zero-pad the (H, W) axes of a (..., H, W, C) array."""
    py, px = halo
    return jnp.pad(x, ((0, 0),) * (x.ndim - 3) + ((py, py), (px, px), (0, 0)))


def _window_hw(xp, halo, shape, offset):
    (py, px), (h, w), (dy, dx) = halo, shape, offset
    return xp[..., py + dy : py + dy + h, px + dx : px + dx + w, :]


def _weighted_windows(w, xp, halo, shape, offsets, ks):
    """``sum_{k in ks} w[..., k] * window_k(xp)``: the K-term sum of ``apply`` (masked ``w``)."""
    y = None
    for k in ks:
        term = w[..., k, None] * _window_hw(xp, halo, shape, offsets[k])
        y = term if y is None else y + term
    return y


def _kernel(a, b, *, kind, offsets):
    """The three faces on (..., H, W, .) arrays (leading axes are a batch)."""
    dtype = jnp.result_type(a, b)
    a, b = a.astype(dtype), b.astype(dtype)
    shape = b.shape[-3:-1]
    halo = _halo(offsets)
    valid = _valid(*shape, offsets)
    bp = _pad_hw(b, halo)
    if kind == "apply":  # a = weights (..., H, W, K), b = x (..., H, W, C)
        w = jnp.where(valid, a, jnp.zeros((), dtype))
        return _weighted_windows(w, bp, halo, shape, offsets, range(len(offsets)))
    if kind == "transpose":  # a = weights, b = x; both windows read pixel j - o_k, and an
        # invalid source entry can only pair with a j outside the image: exact without a mask
        ap = _pad_hw(a, halo)
        y = jnp.zeros(b.shape, dtype)
        for k, (dy, dx) in enumerate(offsets):
            src = (-dy, -dx)
            y = y + _window_hw(ap, halo, shape, src)[..., k, None] * _window_hw(bp, halo, shape, src)
        return y
    # correlate: a = g (..., H, W, C), b = x (..., H, W, C) -> (..., H, W, K).
    # The channel sums are taken _CORRELATE_GROUP offsets at a time by one variadic
    # reduce: XLA CPU fuses it with the products and windows, whereas one jnp.sum per
    # offset becomes a separate YNN reduce fusion and a copied window each (~15x slower at
    # K = 144, see docs/benchmarks/stencil.md).
    # Both operands are materialised first (_materialized): as the weight cotangent of
    # ``sum(apply(w, x)**2)`` (g = 2 apply(w, x)), XLA CPU fused the whole forward into each
    # of the K products and recomputed it K times (34-45x the forward at K = 144).
    a, b = _materialized(a, b)
    bp = _pad_hw(b, halo)
    zero = jnp.zeros((), dtype)
    sums = []
    for j in range(0, len(offsets), _CORRELATE_GROUP):
        products = tuple(a * _window_hw(bp, halo, shape, o) for o in offsets[j : j + _CORRELATE_GROUP])
        sums.extend(jax.lax.reduce(products, (zero,) * len(products), _add_all, (a.ndim - 1,)))
    return jnp.where(valid, jnp.stack(sums, axis=-1), zero)


_CORRELATE_GROUP = 8


def _materialized(*xs):
    """``xs`` unchanged, but computed into memory before any use: the operands of an always
    taken ``lax.cond`` (its predicate reads one value, so XLA cannot fold it away). A
    conditional is a fusion boundary for XLA: the producers of ``xs`` cannot be fused into,
    and recomputed inside, the consumers. (``lax.optimization_barrier`` does not do this on
    XLA CPU, which removes it before fusion; measured in docs/benchmarks/stencil.md.)
    """
    if any(x.size == 0 for x in xs):
        return xs
    keep = jnp.logical_not(jnp.isnan(xs[0].reshape(-1)[0]))  # True unless a NaN; both branches are exact
    return jax.lax.cond(keep, lambda *v: v, lambda *v: tuple(u * 1 for u in v), *xs)


def _add_all(xs, ys):
    return tuple(x + y for x, y in zip(xs, ys))


_stencil_p = jex_core.Primitive("rwseg_stencil")
_kernel_jit = jax.jit(_kernel, static_argnames=("kind", "offsets"))
_stencil_p.def_impl(lambda a, b, *, kind, offsets: _kernel_jit(a, b, kind=kind, offsets=offsets))


def _varying(aval):
    return getattr(getattr(aval, "mat", None), "varying", frozenset())


def _abstract_eval(a, b, *, kind, offsets):
    shape = b.shape[:-1] + (len(offsets),) if kind == "correlate" else b.shape
    # Built from an operand's aval so that shard_map's record of the mesh axes a value
    # varies over carries through (the output varies wherever an operand does).
    template = a if _varying(b) <= _varying(a) else b
    if not _varying(a) | _varying(b) <= _varying(template):
        raise ValueError(
            f"rwseg.stencil: weights and x vary over different manual mesh axes "
            f"({sorted(_varying(a))} and {sorted(_varying(b))}); apply jax.lax.pvary to one of them"
        )
    return template.update(shape=shape, dtype=jnp.result_type(a.dtype, b.dtype), weak_type=False)


_stencil_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(_stencil_p, mlir.lower_fun(_kernel, multiple_results=False))


def _bind(kind, a, b, offsets):
    return _stencil_p.bind(a, b, kind=kind, offsets=offsets)


def _ct(value, primal):
    """A cotangent in the dtype of the (undefined) primal it belongs to."""
    return value.astype(primal.aval.dtype)


def _transpose_lhs(ct, a, b, *, kind, offsets):
    if kind == "apply":
        return _ct(_bind("correlate", ct, b, offsets), a)
    if kind == "transpose":
        return _ct(_bind("correlate", b, ct, offsets), a)
    return _ct(_bind("apply", ct, b, offsets), a)


def _transpose_rhs(ct, a, b, *, kind, offsets):
    if kind == "apply":
        return _ct(_bind("transpose", a, ct, offsets), b)
    if kind == "transpose":
        return _ct(_bind("apply", a, ct, offsets), b)
    return _ct(_bind("transpose", ct, a, offsets), b)


ad.defbilinear(_stencil_p, _transpose_lhs, _transpose_rhs)


def _batch_rule(args, dims, *, kind, offsets):
    a, b = args
    da, db = dims
    if da is None and kind != "correlate":
        # shared weights: fold the batch of x into its channels, one pass for the batch
        b = jnp.moveaxis(b, db, -2)  # (..., H, W, B, C)
        lead, (h, w, n, c) = b.shape[:-4], b.shape[-4:]
        y = _bind(kind, a, b.reshape(lead + (h, w, n * c)), offsets).reshape(lead + (h, w, n, c))
        return y, y.ndim - 2
    size = a.shape[da] if da is not None else b.shape[db]
    a = jnp.moveaxis(a, da, 0) if da is not None else jnp.broadcast_to(a, (size,) + a.shape)
    b = jnp.moveaxis(b, db, 0) if db is not None else jnp.broadcast_to(b, (size,) + b.shape)
    return _bind(kind, a, b, offsets), 0


batching.primitive_batchers[_stencil_p] = _batch_rule


def apply(weights, x, offsets) -> jnp.ndarray:
    """Sparse matrix-vector product on the stencil: ``y[i] = sum_k weights[i, k] x[i + o_k]``.

    Entries pointing outside the image are ignored exactly (masked with ``where``: a NaN
    or inf weight there does not reach ``y``). This is ``to_dense(weights, offsets) @
    x.reshape(H*W, C)`` without the matrix: one pass over the K shifted copies, memory
    O(H·W·C).

    Differentiation is hand-written: reverse mode gives ``dx = apply_transpose(weights, g)``
    and ``dw[i, k] = sum_c g[i, c] x[i + o_k, c]`` on valid entries (zero elsewhere), two
    passes of the forward's shape; forward mode is ``apply(dw, x) + apply(weights, dx)``;
    both compose to any order and under ``vmap``. The weight correlation materialises its
    operands first, so its cost does not depend on the loss: without that, XLA CPU fused
    the forward into each of its K products when ``g`` is a function of ``y`` (``jax.grad``
    of ``sum(apply(w, x)**2)`` in ``w`` cost 49x the forward at K = 144, 64x64x21, against
    2.0x now; vjp, log-softmax loss and both gradients 2-4x: docs/benchmarks/stencil.md).

    Args:
        weights: (H, W, K) float, entry ``[i, k]`` linking ``i`` to ``i + o_k``.
        x: (H, W, C) float.
        offsets: K stencil offsets ``(dy, dx)``.

    Returns:
        y: (H, W, C) in ``result_type(weights, x)``.
    """
    offsets = as_offsets(offsets)
    _check_map("x", x)
    _check_weights(weights, x.shape, offsets)
    return _bind("apply", weights, x, offsets)


def apply_transpose(weights, x, offsets) -> jnp.ndarray:
    """The exact adjoint of :func:`apply`: ``y[j] = sum_k weights[j - o_k, k] x[j - o_k]``.

    Equals ``to_dense(weights, offsets).T @ x.reshape(H*W, C)``; memory O(H·W·C). Entries
    pointing outside the image are ignored exactly. Its reverse mode is
    ``dx = apply(weights, g)``, ``dw[i, k] = sum_c x[i, c] g[i + o_k, c]`` (valid entries).

    Args:
        weights: (H, W, K) float.
        x: (H, W, C) float.
        offsets: K stencil offsets ``(dy, dx)``.

    Returns:
        (H, W, C) in ``result_type(weights, x)``.
    """
    offsets = as_offsets(offsets)
    _check_map("x", x)
    _check_weights(weights, x.shape, offsets)
    return _bind("transpose", weights, x, offsets)


def mask_weights(weights, offsets) -> jnp.ndarray:
    """Zero the entries of ``weights`` that point outside the image (NaN/inf there dropped).

    Args:
        weights: (H, W, K) float stencil weights.
        offsets: K stencil offsets ``(dy, dx)``.

    Returns:
        (H, W, K) in the dtype of ``weights``; the input of :func:`apply_masked`.
    """
    offsets = as_offsets(offsets)
    h, w, _ = weights.shape
    return jnp.where(valid_mask(h, w, offsets), weights, jnp.zeros((), weights.dtype))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _apply_masked(weights, x, offsets, group):
    shape, halo = x.shape[-3:-1], _halo(offsets)
    xp = _pad_hw(x, halo)
    y = None
    parts = np.array_split(np.arange(len(offsets)), -(-len(offsets) // group))
    for n, part in enumerate(parts):
        t = _weighted_windows(weights, xp, halo, shape, offsets, part)
        if n < len(parts) - 1:
            t = jax.lax.optimization_barrier(t)
        y = t if y is None else y + t
    return y


@_apply_masked.defjvp
def _apply_masked_jvp(offsets, group, primals, tangents):
    weights, x = primals
    dw, dx = tangents
    return _apply_masked(weights, x, offsets, group), apply(dw, x, offsets) + apply(weights, dx, offsets)


def apply_masked(weights, x, offsets, *, group: int = 40) -> jnp.ndarray:
    """:func:`apply` for weights already zero outside the image: the form for solver loops.

    The same map as :func:`apply` (``y[i] = sum_k weights[i, k] x[i + o_k]``), computed as
    plain pad-and-slice windows summed in groups of at most ``group`` offsets with an
    optimization barrier between groups. Inside a Krylov loop XLA's CPU code for this runs
    ~2.5x faster than the :func:`apply` primitive, whose lowering re-masks the weights on
    every call, and for K = 80 two loops over 40 shifted operands ran 1.2-1.6x faster than
    one loop over 80 (128x128x24; docs/benchmarks/random_walks.md). Mask the weights once,
    outside the loop, with :func:`mask_weights`. Derivatives are :func:`apply`'s (the map is
    bilinear), so reverse mode through an implicit solve costs one stencil correlation
    rather than K transposed slices.

    Args:
        weights: (H, W, K) float, zero wherever :func:`valid_mask` is False (from
            :func:`mask_weights`); entries there are NOT ignored.
        x: (H, W, C) float.
        offsets: K stencil offsets ``(dy, dx)``.
        group: offsets per summation group.

    Returns:
        y: (H, W, C) in ``result_type(weights, x)``.
    """
    offsets = as_offsets(offsets)
    _check_map("x", x)
    _check_weights(weights, x.shape, offsets)
    if int(group) < 1:
        raise ValueError(f"group: expected a positive number of offsets per group, got {group!r}")
    dtype = jnp.result_type(weights, x)
    return _apply_masked(weights.astype(dtype), x.astype(dtype), offsets, int(group))


def degree(weights, offsets) -> jnp.ndarray:
    """Row sums over valid entries: ``d[i] = sum_k weights[i, k] [i + o_k inside]``.

    The ``D`` of ``A = D^-1 W`` (RWN, Bertasius et al., eq. 2; docs/methods.md §1).

    Args:
        weights: (H, W, K) array.
        offsets: K stencil offsets ``(dy, dx)``.

    Returns:
        (H, W) in the dtype of ``weights``.
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

    Args:
        weights: (H, W, K) array.
        offsets: K stencil offsets ``(dy, dx)``.

    Returns:
        (H·W, H·W) dense matrix in the dtype of ``weights``.
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


def asymmetry(weights, offsets):
    """How far stencil weights are from describing a symmetric matrix ``W = W^T``.

    O(H·W·K): one shift of an (H, W) slice per offset. Used by the symmetry checks of the
    converged RWN walk (Bertasius et al., eq. 3 with CG) and of the GCRF similarity
    (Vemulapalli et al., eq. 1).

    Args:
        weights: (H, W, K) float, entry ``[i, k]`` linking ``i`` to ``i + o_k``.
        offsets: K offsets; ``-o`` must be in the stencil for every ``o`` (``ValueError``
            naming the missing ones otherwise).

    Returns:
        ``(defect, scale)``, two scalars: ``defect = max |weights[i, o] - weights[i + o, -o]|``
            over entries inside the image (``max |M - M^T|`` of :func:`to_dense`), NaN when a
            weight inside the image is NaN/inf; ``scale = max |weights|`` over the same entries.
            Entries pointing outside the image are ignored (``where``).
    """
    offsets = as_offsets(offsets)
    V.check_rank("weights", weights, 3, "(H, W, K)")
    h, w, _ = weights.shape
    V.check_shape("weights", weights, (h, w, len(offsets)), f"(H, W, K) with K = len(offsets) = {len(offsets)}")
    index = {o: k for k, o in enumerate(offsets)}
    missing = [o for o in offsets if (-o[0], -o[1]) not in index]
    if missing:
        raise ValueError(f"offsets: a symmetric W needs -o in the stencil for every offset o; missing the "
                         f"negation of {missing[:3]}")
    valid = valid_mask(h, w, offsets)
    wv = jnp.where(valid, weights, 0)
    back = jnp.stack([shift(wv[..., index[(-dy, -dx)]], (dy, dx)) for dy, dx in offsets], axis=-1)
    defect = jnp.max(jnp.abs(jnp.where(valid, wv - back, 0)))
    return jnp.where(jnp.all(jnp.isfinite(wv)), defect, jnp.nan), jnp.max(jnp.abs(wv))


def label_affinity(labels, offsets, *, ignore_index: int = IGNORE_INDEX):
    """Ground-truth affinities on the stencil (RWN §3.3, dilated affinity §3.1).

    Args:
        labels: (H, W) int labels.
        offsets: K stencil offsets ``(dy, dx)``.
        ignore_index: label value that makes a pair invalid (as does a negative label).

    Returns:
        ``(targets, valid)``, both (H, W, K): ``targets`` float32, 1.0 where pixel ``i`` and
            ``i + o_k`` share a label, else 0.0; ``valid`` bool, False where either label is
            negative or ``ignore_index``, or the neighbour is outside the image.
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
