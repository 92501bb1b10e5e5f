"""The stacked SPN column recurrence and its transpose: one ``lax.scan`` or one Pallas kernel.

:mod:`rwseg.spn` maps every direction of a propagation to one time-major system of
``T`` steps over a column of ``R`` rows (directions stacked as row segments, gates
outside the image already zeroed) and solves it here. With the input term ``b`` of shape
``(T, R, C)`` and the gates ``p`` of shape ``(T, G, R, C)`` (Liu et al., *Learning
Affinity via Spatial Propagation Networks*, NIPS 2017, eq. 1 / eq. 5, with
``d = (-1, 0, +1)`` three-way, ``(0,)`` one-way):

    forward     h_t = b_t + P_t h_{t-1},         t = 0 .. T-1, h_{-1} = 0
    transpose   l_t = b_t + P_{t+1}^T l_{t+1},   t = T-1 .. 0, l_T = 0

with ``(P_t v)[i] = sum_k p_k[t, i] v[i + d_k]`` and
``(P_t^T v)[j] = sum_k p_k[t, j - d_k] v[j - d_k]``, elementwise in the channel.
The transpose is the adjoint recurrence used for the backward pass: the reverse scan with
transposed three-way gates (the coupling of row ``j`` to ``j - 1`` takes the gate of row
``j - 1`` that pointed down, and so on). Both run with one column ``(R, C)`` carried from
step to step; no per-step intermediates are stored.

Three implementations of the same step functions (:func:`column_step`,
:func:`column_step_transposed`, :func:`mirrored_gates`):

- :func:`scan_recurrence`: ``jax.lax.scan`` over the leading (time) axis, the carried
  column shifted by two concatenates. The CPU path.
- :func:`recurrence`: a Pallas kernel, one program per (row segment = image direction,
  channel tile) — batches under ``vmap`` add a grid axis, so per (image, direction,
  channel tile). Each program loops over the ``T`` columns inside the kernel
  (``lax.fori_loop``) holding its column ``(L, channel_tile)`` as the loop carry (on chip),
  reading one column of ``b`` and of each gate and writing one output column per step. The grid
  tiles channels, never rows: the three-way coupling needs the whole column. With
  ``interpret=True`` the same kernel runs on any backend (slow; tests).
- :func:`recurrence_gpu`: the same grid and loop for the Triton backend of Pallas (GPU).
  Triton has no lowering for slicing a value, so the row shift goes through memory: each
  finished column is stored to the output and the next step loads its neighbours
  ``h_{t-1}[i + d]`` back with masked gather loads; the transpose uses the mirrored gates
  (``P^T = sum_j diag(S_{d_j} p_{G-1-j}) S_{d_j}``) so that it, too, only shifts loads.
  Rows are padded to a power of two per segment, channels to the power-of-two tile.

Status on accelerators (no GPU or TPU was available when this was written; the kernels
are verified in interpret mode only, ``tests/test_spn_pallas.py``): :func:`recurrence`
lowers for TPU (Mosaic TPU lowering runs without a device; it compiles for a v5e without
one) but it has never run on a TPU. It does not lower for GPU (Mosaic GPU rejects its
strided block loads; Triton cannot slice a value). :func:`recurrence_gpu` lowers for CUDA
(Triton; checked without a device, forward, transpose and the whole batched,
differentiated layer); it has not been compiled by Triton or run on a GPU.

Neither kernel has been compared with the scan on a chip, so ``implementation="auto"``
uses one only where it is verified on that device kind (:mod:`rwseg.spn_verify`: a
recorded run of the device check ``rwseg check-kernels``, none yet, or the opt-in
self-check at first use, ``RWSEG_SPN_SELF_CHECK=1``) and, on TPU, one program's blocks, as
Mosaic pads and double-buffers them, fit the 16 MiB of scoped VMEM (:func:`fits_on_chip`: maps
up to 56x56 in float32, three-way, at up to 128 channels; larger maps take the scan), on GPU it lowers and compiles for the shape
(:func:`gpu_kernel_lowers`); else the scan. ``implementation="pallas"`` forces the kernel
(the Triton one on GPU).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

__all__ = ["ROW_STEPS", "shift_rows", "column_step", "column_step_transposed", "mirrored_gates",
           "scan_recurrence", "recurrence", "fits_on_chip", "channel_tile", "recurrence_gpu",
           "gpu_channel_tile", "gpu_kernel_lowers"]

ROW_STEPS = {1: (0,), 3: (-1, 0, 1)}  # d_k for gate k, one-way and three-way; d_{G-1-k} = -d_k


def shift_rows(v, d: int, axis: int = 0):
    """Shifts rows: ``out[i] = v[i + d]`` along ``axis``, zero outside.

    Args:
        v: an array.
        d: the shift, in ``{-1, 0, +1}``.
        axis: the axis shifted.

    Returns:
        An array of ``v``'s shape and dtype.
    """
    if d == 0:
        return v
    n = v.shape[axis]
    zero = jnp.zeros_like(jax.lax.slice_in_dim(v, 0, 1, axis=axis))
    if d < 0:
        return jnp.concatenate([zero, jax.lax.slice_in_dim(v, 0, n - 1, axis=axis)], axis=axis)
    return jnp.concatenate([jax.lax.slice_in_dim(v, 1, n, axis=axis), zero], axis=axis)


def column_step(b_t, p_t, h, shift=shift_rows):
    """One forward step ``h_t = b_t + P_t h_{t-1}`` (eq. 1 of Liu et al.).

    Args:
        b_t: ``(L, C)``, the input term of the step.
        p_t: the ``G`` gates of the step (``G`` = 1 or 3): an array ``(G, L, C)`` or a
            sequence of ``(L, C)``.
        h: ``(L, C)``, the previous column ``h_{t-1}``.
        shift: how the neighbours ``h[i + d]`` (zero outside) are formed:
            :func:`shift_rows` on a value; the GPU kernel passes a masked load from memory
            instead (``h`` is then a column in a ref).

    Returns:
        The new column ``h_t``, ``(L, C)``.
    """
    steps = ROW_STEPS[len(p_t)]
    return b_t + sum(p_t[k] * shift(h, d) for k, d in enumerate(steps))


def column_step_transposed(p_t, lam):
    """The transposed step's product ``P_t^T lam``.

    Args:
        p_t: the ``G`` gates of the step, as in :func:`column_step`.
        lam: ``(L, C)``.

    Returns:
        ``P_t^T lam``, ``(L, C)``.
    """
    steps = ROW_STEPS[len(p_t)]
    return sum(shift_rows(p_t[k] * lam, -d) for k, d in enumerate(steps))


def mirrored_gates(p_t, shift=shift_rows):
    """The gates of ``P_t^T`` in the form of :func:`column_step`: ``P_t^T v = sum_j q_j * v[i + d_j]``.

    Since ``d_{G-1-j} = -d_j``, ``P_t^T = sum_j diag(S_{d_j} p_{G-1-j}) S_{d_j}`` with
    ``(S_d v)[i] = v[i + d]``: ``q_j = shift(p_t[G - 1 - j], d_j)``. So the transposed step
    is ``column_step(b_t, mirrored_gates(p_{t+1}), l_{t+1})`` (the GPU kernel's form: every
    shift is a shifted load, no product is stored to be shifted).

    Args:
        p_t: the ``G`` gates of the step, as in :func:`column_step`.
        shift: how a gate is shifted (:func:`shift_rows`, or the GPU kernel's masked load).

    Returns:
        The list of the ``G`` mirrored gates ``q_j``, each ``(L, C)``.
    """
    steps = ROW_STEPS[len(p_t)]
    return [shift(p_t[len(steps) - 1 - j], d) for j, d in enumerate(steps)]


def scan_recurrence(b, p, *, transpose: bool = False):
    """The recurrence (or its transpose) as one ``lax.scan`` (the CPU path).

    Args:
        b: ``(T, R, C)``, the input terms.
        p: ``(T, G, R, C)``, the gates (``G`` = 1 or 3).
        transpose: solve the transposed (adjoint) recurrence, a reverse scan.

    Returns:
        ``(T, R, C)``: every column ``h_t`` (or ``l_t``), in ``b``'s dtype.
    """
    init = jnp.zeros(b.shape[1:], b.dtype)
    if not transpose:

        def step(h, column):
            h = column_step(*column, h)
            return h, h

        return jax.lax.scan(step, init, (b, p))[1]

    def step_t(carry, column):
        b_t, p_t = column
        lam = b_t + carry
        return column_step_transposed(p_t, lam), lam

    return jax.lax.scan(step_t, init, (b, p), reverse=True)[1]


def fits_on_chip(steps: int, rows: int, channels: int, num_gates: int, itemsize: int,
                 budget: int = 16 << 20) -> bool:
    """Whether one program's blocks fit the TPU's scoped VMEM, as Mosaic lays them out.

    The kernel's BlockSpecs bring whole ``(T, L, tile)`` sequences of ``b``, of the ``G``
    gates and of the output into VMEM, and Mosaic tiles the two minor dimensions
    ``(L, tile)`` in ``(8, 128)`` tiles: the channel tile takes at least 128 lanes (a tile
    of 8 channels occupies 16x its bytes) and the rows a multiple of 8 sublanes; each block
    is double-buffered. Measured (v5e:2x2 ahead-of-time compile, ``spn`` value and gradient,
    64x64x8): the compiler asks for a 20.00 MiB scoped allocation, exactly this count, and
    refuses it against its 16 MiB scoped limit; at 256x256x8 a single gate window needs
    192 MiB (> the chip's 128 MiB VMEM). The unpadded count (4x less at 8 channels, no
    double buffering) made ``"auto"`` pick a kernel that does not compile.

    Args:
        steps: ``T``.
        rows: ``L``, the rows of one segment.
        channels: ``C``.
        num_gates: ``G``.
        itemsize: bytes per element.
        budget: bytes allowed (default 16 MiB, Mosaic's default scoped VMEM limit on v4/v5e).

    Returns:
        True when ``2 T (2 + G) ceil8(L) ceil128(tile) itemsize <= budget``.
    """
    lanes = -(-channel_tile(channels) // 128) * 128
    sublanes = -(-rows // 8) * 8
    return 2 * steps * (2 + num_gates) * sublanes * lanes * itemsize <= budget


def channel_tile(channels: int) -> int:
    """Channels per program of :func:`recurrence`.

    A TPU block's minor dimension must be the whole axis or a multiple of 128 lanes.

    Args:
        channels: ``C``.

    Returns:
        ``C`` up to 128, else the largest multiple of 128 that divides ``C`` (``C`` when
        there is none).
    """
    if channels <= 128:
        return channels
    tiles = [t for t in range(128, channels, 128) if channels % t == 0]
    return max(tiles) if tiles else channels


def _kernel(b_ref, p_ref, o_ref, *, transpose: bool):
    """One program: b_ref, o_ref (T, L, ct), p_ref (T, G, L, ct); loops over the T columns."""
    steps, num_gates = p_ref.shape[0], p_ref.shape[1]

    def gates(t):
        return [p_ref[t, k] for k in range(num_gates)]

    init = jnp.zeros(o_ref.shape[1:], o_ref.dtype)
    if not transpose:

        def body(t, h):
            h = column_step(b_ref[t], gates(t), h)
            o_ref[t] = h
            return h

    else:

        def body(i, carry):
            t = steps - 1 - i
            lam = b_ref[t] + carry
            o_ref[t] = lam
            return column_step_transposed(gates(t), lam)

    jax.lax.fori_loop(0, steps, body, init)


def recurrence(b, p, *, transpose: bool = False, segment_rows: int | None = None,
               channel_tile_size: int | None = None, interpret: bool = False):
    """The recurrence (or its transpose) as one Pallas kernel (Mosaic TPU, or interpret mode).

    Grid: ``(R // segment_rows, C // channel_tile_size)``.

    Args:
        b: ``(T, R, C)``, the input terms.
        p: ``(T, G, R, C)``, the gates (``G`` = 1 or 3).
        transpose: solve the transposed (adjoint) recurrence.
        segment_rows: the rows of one independent segment (one direction); ``R`` must be a
            multiple of it (default ``R``, one segment).
        channel_tile_size: channels per program (default :func:`channel_tile`); must
            divide ``C``.
        interpret: run in Pallas interpret mode (any backend).

    Returns:
        ``(T, R, C)``, as :func:`scan_recurrence`.

    Raises:
        ValueError: ``segment_rows`` or the channel tile does not divide ``R`` or ``C``.
    """
    steps, rows, channels = b.shape
    num_gates = p.shape[1]
    seg = rows if segment_rows is None else segment_rows
    ct = channel_tile(channels) if channel_tile_size is None else channel_tile_size
    if rows % seg or channels % ct:
        raise ValueError(f"segment_rows={seg} and channel tile {ct} must divide R={rows} and C={channels}")
    return pl.pallas_call(
        functools.partial(_kernel, transpose=transpose),
        out_shape=jax.ShapeDtypeStruct((steps, rows, channels), b.dtype),
        grid=(rows // seg, channels // ct),
        in_specs=[pl.BlockSpec((steps, seg, ct), lambda s, c: (0, s, c)),
                  pl.BlockSpec((steps, num_gates, seg, ct), lambda s, c: (0, 0, s, c))],
        out_specs=pl.BlockSpec((steps, seg, ct), lambda s, c: (0, s, c)),
        interpret=interpret,
    )(b, p)


# --------------------------------------------------------------------------- GPU (Triton) variant


class _Column(NamedTuple):
    """Column ``ref[lead]`` of a kernel ref, (L, ct): read only through :func:`_load_shifted`.

    Indexing adds to ``lead``, so a gate ref's column ``(t,)`` indexed by ``k`` is the
    column ``(t, k)``: it stands for ``p_t`` in :func:`mirrored_gates`.
    """

    ref: object
    lead: tuple

    def __len__(self):
        return self.ref.shape[len(self.lead)]

    def __getitem__(self, k):
        return _Column(self.ref, self.lead + (k,))


def _load_shifted(column: _Column, d: int):
    """``out[i] = column[i + d]``, zero outside: one masked gather load (no value slicing).

    Row and channel indices are integer arrays (clipped into the block, the rows outside
    masked to zero): Triton lowers them to a masked pointer load, and interpret mode
    discharges them as a gather.
    """
    rows, ct = column.ref.shape[-2:]
    i = jax.lax.broadcasted_iota(jnp.int32, (rows, ct), 0) + d
    c = jax.lax.broadcasted_iota(jnp.int32, (rows, ct), 1)
    inside = (i >= 0) & (i < rows)
    idx = column.lead + (jnp.clip(i, 0, rows - 1), c)
    return plt.load(column.ref.at[idx], mask=inside, other=jnp.zeros((), column.ref.dtype))


def _gpu_kernel(b_ref, p_ref, o_ref, *, transpose: bool, barrier: bool):
    """One program: b_ref, o_ref (T, L, ct), p_ref (T, G, L, ct), L and ct powers of two.

    Each finished column is stored to ``o_ref[t]`` and the next step reads its shifted
    neighbours back from there (:func:`_load_shifted`): the column never has to be sliced
    in registers. A barrier orders each column's store before the next step's loads
    (other threads of the program read rows this thread wrote).
    Forward ``h_t = column_step(b_t, p_t, h_{t-1})``; transpose
    ``l_t = column_step(b_t, mirrored_gates(p_{t+1}), l_{t+1})``.
    """
    steps = p_ref.shape[0]
    first, sign = (steps - 1, -1) if transpose else (0, 1)
    o_ref[first] = b_ref[first]

    def body(i, carry):
        t = first + sign * i
        prev = t - sign
        if barrier:
            plt.debug_barrier()
        if transpose:
            gates = mirrored_gates(_Column(p_ref, (prev,)), shift=_load_shifted)
        else:
            gates = [p_ref[t, k] for k in range(p_ref.shape[1])]
        o_ref[t] = column_step(b_ref[t], gates, _Column(o_ref, (prev,)), shift=_load_shifted)
        return carry

    jax.lax.fori_loop(1, steps, body, 0)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def gpu_channel_tile(rows: int, channels: int, elements: int = 2048) -> int:
    """Channels per GPU program of :func:`recurrence_gpu`.

    Triton block shapes must be powers of two; the bound keeps one ``(L, tile)`` column in
    registers.

    Args:
        rows: the segment height, already rounded up to a power of two.
        channels: ``C``.
        elements: the most elements of one column ``(rows, tile)``.

    Returns:
        A power of two, at most the next power of two of ``C``, with
        ``rows * tile <= elements`` (at least 1).
    """
    return max(1, min(_next_pow2(channels), elements // rows))


def recurrence_gpu(b, p, *, transpose: bool = False, segment_rows: int | None = None,
                   channel_tile_size: int | None = None, interpret: bool = False):
    """The recurrence (or its transpose) as a Pallas Triton kernel (GPU).

    Each segment is zero-padded to a power-of-two number of rows and the channels to a
    multiple of the power-of-two channel tile (:func:`gpu_channel_tile`), as Triton needs;
    padded rows carry zero input and zero gates (and the gates crossing into them are
    already zero), so they stay zero and are cut off again. Grid: ``(R // segment_rows,
    padded C // tile)``; each program loops over the ``T`` columns, streaming them from
    global memory. ``num_stages=1``: no software pipelining, whose early loads would read
    ``o_ref[t - 1]`` before it is written.

    Args:
        b: ``(T, R, C)``, the input terms.
        p: ``(T, G, R, C)``, the gates (``G`` = 1 or 3).
        transpose: solve the transposed (adjoint) recurrence.
        segment_rows: the rows of one independent segment (default ``R``); must divide ``R``.
        channel_tile_size: channels per program, a power of two (default
            :func:`gpu_channel_tile`).
        interpret: run in Pallas interpret mode (any backend; no barrier).

    Returns:
        ``(T, R, C)``, as :func:`scan_recurrence`.

    Raises:
        ValueError: ``segment_rows`` does not divide ``R``, or the tile is not a power of two.
    """
    steps, rows, channels = b.shape
    num_gates = p.shape[1]
    seg = rows if segment_rows is None else segment_rows
    if rows % seg:
        raise ValueError(f"segment_rows={seg} must divide R={rows}")
    segments, seg_p = rows // seg, _next_pow2(seg)
    ct = gpu_channel_tile(seg_p, channels) if channel_tile_size is None else channel_tile_size
    if ct != _next_pow2(ct):
        raise ValueError(f"channel_tile_size: expected a power of two, got {ct}")
    chan_p = -(-channels // ct) * ct

    def padded(a):  # (..., R, C) -> (..., S * seg_p, chan_p)
        if (seg_p, chan_p) == (seg, channels):
            return a
        a = a.reshape(a.shape[:-2] + (segments, seg, channels))
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, seg_p - seg), (0, chan_p - channels)])
        return a.reshape(a.shape[:-3] + (segments * seg_p, chan_p))

    out = pl.pallas_call(
        functools.partial(_gpu_kernel, transpose=transpose, barrier=not interpret),
        out_shape=jax.ShapeDtypeStruct((steps, segments * seg_p, chan_p), b.dtype),
        grid=(segments, chan_p // ct),
        in_specs=[pl.BlockSpec((steps, seg_p, ct), lambda s, c: (0, s, c)),
                  pl.BlockSpec((steps, num_gates, seg_p, ct), lambda s, c: (0, 0, s, c))],
        out_specs=pl.BlockSpec((steps, seg_p, ct), lambda s, c: (0, s, c)),
        compiler_params=plt.CompilerParams(num_stages=1),
        interpret=interpret,
    )(padded(b), padded(p))
    if (seg_p, chan_p) == (seg, channels):
        return out
    return out.reshape(steps, segments, seg_p, chan_p)[:, :, :seg, :channels].reshape(steps, rows, channels)


@functools.lru_cache(maxsize=64)
def gpu_kernel_lowers(steps: int, rows: int, channels: int, num_gates: int, dtype: str, segment_rows: int,
                      platform: str | None = None) -> bool:
    """Whether :func:`recurrence_gpu` (forward and transpose) lowers for these shapes.

    ``implementation="auto"`` uses the GPU kernel only when this holds (cached per shape).

    Args:
        steps: ``T``.
        rows: ``R``.
        channels: ``C``.
        num_gates: ``G``.
        dtype: the dtype's name, e.g. ``"float32"``.
        segment_rows: the rows of one segment.
        platform: a lowering platform (``"cuda"``, ``"rocm"``; lowering needs no device),
            or ``None`` for the default backend, where the kernels are also compiled.

    Returns:
        True when both kernels lower (and, with ``platform=None``, compile); False on any
        failure.
    """
    b = jax.ShapeDtypeStruct((steps, rows, channels), jnp.dtype(dtype))
    p = jax.ShapeDtypeStruct((steps, num_gates, rows, channels), jnp.dtype(dtype))
    kwargs = {} if platform is None else {"lowering_platforms": (platform,)}
    try:
        for transpose in (False, True):
            f = functools.partial(recurrence_gpu, transpose=transpose, segment_rows=segment_rows)
            lowered = jax.jit(f).trace(b, p).lower(**kwargs)
            if platform is None:
                lowered.compile()
    except Exception:  # noqa: BLE001 - any lowering failure means: use the scan
        return False
    return True
