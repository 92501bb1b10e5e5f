"""Gaussian CRF with bipartite Gaussian mean-field inference.

Vemulapalli, Tuzel, Liu & Chellappa, *Gaussian Conditional Random Field Network for
Semantic Segmentation* (CVPR 2016); "the paper" below.

Every pixel ``i`` carries a K-vector ``y_i`` (K classes). The energy (paper eq. 1)::

    E(y) = sum_i ||y_i - r_i||^2 + sum_{unordered pairs (i, j)} s_ij (y_i - y_j)^T C (y_i - y_j)

has unary scores ``r`` (H, W, K), a pairwise similarity ``s`` on a stencil of offsets
(an (H, W, N) array, entry ``[i, n]`` linking ``i`` to ``i + o_n``, see
:mod:`rwseg.stencil`) and a class compatibility ``C = R R^T`` (PSD). Its minimiser
solves the symmetric positive definite system ``(I + L_s ⊗ C) y = r`` with
``L_s = diag(S) - s`` the graph Laplacian, ``S_i = sum_j s_ij``.

Gaussian mean field (eq. 2) updates one pixel exactly given the others::

    (I + S_i C) mu_i = r_i + C sum_j s_ij mu_j

On a *bipartite* stencil (every offset has an odd ``dx``) no edge joins two pixels of
the same column parity, so all even columns are updated at once, then all odd columns
(one GMF layer, §4 and Fig. 3). Each half-update minimises ``E`` exactly over its block,
so the energy never increases and the iteration converges to the unique minimiser.

Conventions and choices (``docs/methods.md`` §4):

- Stencils must be *bipartite* (every ``dx`` odd) and *symmetric* (``-o`` is in the
  stencil whenever ``o`` is); each unordered pair then appears twice, once from each
  end, and ``similarity`` must agree on both (``s[i, o] == s[i + o, -o]``), as
  :func:`pairwise_similarity` guarantees by construction. Entries pointing outside the
  image are ignored.
- :func:`bipartite_offsets` reads the paper's "every other neighbour along rows and
  columns" (Fig. 2) as *odd dy and odd dx* (``pattern="odd"``, default);
  ``pattern="odd_columns"`` keeps every row (odd dx, any dy). Both are bipartite.
- The per-pixel K x K systems ``I + S_i C`` depend only on the scalar ``S_i`` and ``C``:
  with one eigendecomposition ``C = U diag(lambda) U^T`` per call (K x K, shared by every
  pixel and layer), ``(I + S_i C)^-1 v = U ((U^T v) / (1 + S_i lambda))``, so a half-update
  is one stencil product and three K x K products over the pixels, and no per-pixel K x K
  map is ever stored (issue 28: on TPU an (H, W, K, K) map pads its two minor dims to a
  tile). Derivatives never go through the eigendecomposition (its derivative is infinite
  at repeated eigenvalues, e.g. the initial ``C = c I``): the per-pixel solve is a
  ``jax.lax.custom_linear_solve`` on ``x -> x + S_i C x``, whose tangent is the exact
  ``(I + S_i C)^-1 (dv - (dS_i C + S_i dC) (I + S_i C)^-1 v)`` at every order.
- ``gmf(num_steps=n)`` unrolls n layers with ``lax.scan`` (the paper's network,
  reverse-mode differentiable through the layers). ``gmf(num_steps=None)`` iterates
  layers in a ``lax.while_loop`` until the largest change of a layer is
  ``<= tol * max|r|`` and is differentiated implicitly: :func:`rwseg.linsolve.implicit_solve`
  on ``(I + L_s ⊗ C)``, whose backward pass is the same GMF iteration on the cotangent.

Value checks: a non-symmetric, non-PSD or non-finite ``compat``, a non-symmetric or
non-finite ``similarity`` (:func:`gmf`) and out-of-range labels raise ``ValueError``
eagerly when the inputs are concrete; under ``jit`` call :func:`gmf` /
:func:`margin_loss` with ``checked=True`` inside ``jax.experimental.checkify.checkify``
to get the same errors (:func:`rwseg._validate.value_check`); unchecked, the converged
:func:`gmf` answers such values with NaN and ``converged=False``.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from rwseg import _validate as V
from rwseg import linsolve, stencil
from rwseg._numerics import masked_mean, safe_divide
from rwseg.constants import IGNORE_INDEX

__all__ = [
    "bipartite_offsets",
    "pairwise_similarity",
    "compatibility",
    "gmf",
    "gmf_half_update",
    "system_matvec",
    "energy",
    "margin_loss",
    "similarity_pretrain_loss",
]

_PATTERNS = ("odd", "odd_columns")


# --------------------------------------------------------------------------- checks


def _check_offsets(offsets) -> stencil.Offsets:
    offsets = stencil.as_offsets(offsets)
    even = [o for o in offsets if o[1] % 2 == 0]
    if even:
        raise ValueError(
            f"offsets: expected every dx odd (a graph bipartite between even and odd columns), "
            f"got {len(even)} offsets with even dx, e.g. {even[0]}"
        )
    missing = [o for o in offsets if (-o[0], -o[1]) not in offsets]
    if missing:
        raise ValueError(
            f"offsets: expected a symmetric stencil (-o present for every o), got {missing[0]} "
            f"without {(-missing[0][0], -missing[0][1])}"
        )
    return offsets


def _check_scores(name, x):
    V.check_rank(name, x, 3, "(H, W, K)")
    V.check_floating(name, x)


def _check_similarity(similarity, hw, offsets):
    V.check_rank("similarity", similarity, 3, "(H, W, N)")
    V.check_floating("similarity", similarity)
    V.check_shape(
        "similarity", similarity, tuple(hw) + (len(offsets),), f"(H, W, N) with N = len(offsets) = {len(offsets)}"
    )


def _compat_defects(c, xp):
    """(asymmetry, min eigenvalue of the symmetric part, scale) of compat ``c`` (numpy or jnp ``xp``)."""
    asym = xp.max(xp.abs(c - c.T))
    scale = xp.max(xp.abs(c))
    return asym, xp.linalg.eigvalsh(0.5 * (c + c.T))[0], scale


def _check_compat(compat, k, checked=False):
    """Shape and value checks of C: finite, symmetric (C = R R^T) and positive semidefinite."""
    V.check_rank("compat", compat, 2, "(K, K)")
    V.check_floating("compat", compat)
    if compat.shape[0] != compat.shape[1]:
        raise ValueError(f"compat: expected a square (K, K) matrix, got shape {tuple(compat.shape)}")
    V.check_shape("compat", compat, (k, k), f"(K, K) with K = {k} classes of unary")
    msg = "compat: expected a symmetric matrix (C = R R^T), got max |C - C^T| = "
    psd = "compat: expected a positive semidefinite matrix (C = R R^T), got smallest eigenvalue "
    if V.is_concrete(compat):
        c = np.asarray(compat, np.float64)
        if not np.all(np.isfinite(c)):
            raise ValueError(f"compat: expected finite values, got {int(np.sum(~np.isfinite(c)))} NaN/inf entries")
        asym, low, scale = _compat_defects(c, np)
        if not asym <= 1e-6 * max(float(scale), 1.0):
            raise ValueError(f"{msg}{asym:.3g}")
        if not low >= -_PSD_RTOL * scale:
            raise ValueError(f"{psd}{low:.3g} (max |C| = {scale:.3g}); build it with compatibility(r)")
    elif checked:
        asym, low, scale = _compat_defects(compat, jnp)
        V.value_check(jnp.all(jnp.isfinite(compat)), "compat: expected finite values, got NaN/inf entries")
        V.value_check(asym <= 1e-6 * jnp.maximum(scale, 1), msg + "{}", asym)
        V.value_check(low >= -_PSD_RTOL * scale, psd + "{} (max |C| = {})", low, scale)


# relative tolerances of the value checks (float32 round-off of C = R R^T and of similarities)
_PSD_RTOL = 1e-5
_SYM_RTOL = 1e-5


def _check_similarity_values(similarity, offsets, checked=False):
    """Finite and symmetric similarity (the converged GMF's implicit gradient relies on it)."""
    msg = ("similarity: expected s[i, o] == s[i + o, -o] (a symmetric graph, as pairwise_similarity "
           "makes it), got max |s[i, o] - s[i + o, -o]| = ")
    if V.is_concrete(similarity):
        sv = np.where(stencil.valid_mask(*similarity.shape[:2], offsets), np.asarray(similarity), 0)
        if not np.all(np.isfinite(sv)):
            raise ValueError(f"similarity: expected finite values, got {int(np.sum(~np.isfinite(sv)))} NaN/inf "
                             "entries (on neighbours inside the image)")
        with jax.ensure_compile_time_eval():  # concrete even when gmf is called inside a jit trace
            defect, scale = (float(v) for v in stencil.asymmetry(jnp.asarray(similarity), offsets))
        if not defect <= _SYM_RTOL * scale:
            raise ValueError(f"{msg}{defect:.3g} (max s = {scale:.3g})")
    elif checked:
        defect, scale = stencil.asymmetry(similarity, offsets)
        V.value_check(~jnp.isnan(defect), "similarity: expected finite values, got NaN/inf entries")
        V.value_check(jnp.isnan(defect) | (defect <= _SYM_RTOL * scale), msg + "{}", defect)


def _values_ok(similarity, compat, offsets):
    """Traced validity flag of the converged GMF problem (symmetric finite s, finite PSD C)."""
    defect, s_scale = stencil.asymmetry(similarity, offsets)
    asym, low, c_scale = _compat_defects(compat, jnp)
    return ((defect <= _SYM_RTOL * s_scale) & jnp.all(jnp.isfinite(compat))
            & (asym <= 1e-6 * jnp.maximum(c_scale, 1)) & (low >= -_PSD_RTOL * c_scale))


def _check_labels(labels, hw, num_classes, ignore_index, checked=False):
    V.check_rank("labels", labels, 2, "(H, W)")
    V.check_integer("labels", labels)
    V.check_shape("labels", labels, tuple(hw), "(H, W) matching y")
    msg = f"labels: expected values in [0, {num_classes}) or ignore_index={ignore_index}"
    if V.is_concrete(labels):
        lab = np.asarray(labels)
        bad = (lab != ignore_index) & ((lab < 0) | (lab >= num_classes))
        if bad.any():
            raise ValueError(f"{msg}, got {int(bad.sum())} other values, e.g. {int(lab[bad][0])}")
    elif checked:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        V.value_check(~jnp.any(bad), msg + ", got {} other values", jnp.sum(bad))
    labels = jnp.asarray(labels)
    return labels


# --------------------------------------------------------------------------- model pieces


def bipartite_offsets(radius: int, *, pattern: str = "odd") -> stencil.Offsets:
    """The GCRF stencil inside the (2·radius + 1)^2 window (paper §3.2, Fig. 2).

    Both patterns are symmetric and bipartite between even and odd columns; sorted by
    (dy, dx).

    Args:
        radius: half-width of the window (int > 0; the paper's 23x23 window is radius 11).
        pattern: ``"odd"`` (default, the reading of docs/methods.md §4): offsets with odd
            dy *and* odd dx, i.e. every other pixel along rows and columns,
            ``4 * ceil(radius / 2)^2`` offsets (144 for radius 11); ``"odd_columns"``: odd
            dx, any dy.

    Returns:
        The offsets, a tuple of ``(dy, dx)`` pairs.
    """
    radius = V.check_nonnegative_int("radius", radius, positive=True)
    if pattern not in _PATTERNS:
        raise ValueError(f"pattern: expected one of {_PATTERNS}, got {pattern!r}")
    rows = range(-radius, radius + 1)
    return tuple(
        (dy, dx) for dy in rows for dx in rows if dx % 2 == 1 and (pattern == "odd_columns" or dy % 2 == 1)
    )


def pairwise_similarity(z, filters, offsets):
    """Learned similarity ``s_ij = exp(-sum_m (f_m . z_i - f_m . z_j)^2)`` (paper §4).

    Symmetric by construction (``s[i, o] == s[i + o, -o]`` exactly). Memory O(H·W·(M + N)).

    Args:
        z: (H, W, D) float pixel features.
        filters: (D, M) float, the M filters f_m as columns.
        offsets: N neighbour offsets ``(dy, dx)``.

    Returns:
        s: (H, W, N) in ``result_type(z, filters)``, ``s[i, n]`` for ``j = i + o_n``, zero
            where ``j`` is outside the image.
    """
    offsets = stencil.as_offsets(offsets)
    V.check_rank("z", z, 3, "(H, W, D)")
    V.check_floating("z", z)
    V.check_rank("filters", filters, 2, "(D, M)")
    V.check_floating("filters", filters)
    V.check_shape("filters", filters, (z.shape[-1], None), f"(D, M) with D = {z.shape[-1]} features of z")
    u = z @ filters  # (H, W, M): f_m . z_i
    h, w = z.shape[:2]
    valid = stencil.valid_mask(h, w, offsets)
    dist = jnp.stack([jnp.sum((u - stencil.shift(u, o)) ** 2, axis=-1) for o in offsets], axis=-1)
    return jnp.where(valid, jnp.exp(-dist), jnp.zeros((), dist.dtype))


def compatibility(r):
    """Class compatibility ``C = R R^T`` with ``R`` the lower triangle of ``r`` (paper §4).

    Args:
        r: (K, K) float unconstrained parameter (its strict upper triangle is ignored).

    Returns:
        C: (K, K) in the dtype of ``r``, symmetric positive semidefinite by construction.
    """
    V.check_rank("r", r, 2, "(K, K)")
    V.check_floating("r", r)
    if r.shape[0] != r.shape[1]:
        raise ValueError(f"r: expected a square (K, K) matrix, got shape {tuple(r.shape)}")
    lower = jnp.tril(r)
    return lower @ lower.T


def system_matvec(similarity, compat, offsets):
    """The linear map ``y -> (I + L_s ⊗ C) y`` whose solution is the GCRF optimum (paper eq. 1-2).

    ``y_i + C (S_i y_i - sum_j s_ij y_j)`` with :func:`rwseg.stencil.apply` /
    :func:`rwseg.stencil.degree`. Symmetric positive definite for a symmetric similarity
    and a PSD ``C``.

    Args:
        similarity: (H, W, N) float similarity s on ``offsets``.
        compat: (K, K) float class compatibility C.
        offsets: N neighbour offsets ``(dy, dx)``.

    Returns:
        A function mapping (H, W, K) to (H, W, K).
    """
    offsets = stencil.as_offsets(offsets)
    deg = stencil.degree(similarity, offsets)[..., None]

    def matvec(y):
        return y + (deg * y - stencil.apply(similarity, y, offsets)) @ compat.T

    return matvec


# --------------------------------------------------------------------------- inference


def _block_eig(compat):
    """``(C_sym, (lambda, U))``: the symmetric part of C (K, K) and its eigendecomposition
    ``C_sym = U diag(lambda) U^T``, lambda (K,) ascending, U (K, K) orthogonal.

    Computed once per call and shared by every pixel and layer. The decomposition is
    taken of ``stop_gradient(C_sym)``: no derivative goes through it (eigenvectors of
    repeated eigenvalues, as at ``C = c I``, have no derivative); :func:`_block_solve`
    differentiates through ``C_sym`` instead. C is symmetric by contract (checked); the
    blocks read its symmetric part so that values and derivatives describe the same
    function for any C; C's gradient through the blocks is therefore symmetric, equal to
    the explicit inverse's along every symmetric direction (e.g. through
    :func:`compatibility`).
    """
    sym = 0.5 * (compat + compat.T)
    lam, u = jnp.linalg.eigh(jax.lax.stop_gradient(sym))
    return sym, (lam, u)


def _block_solve(deg, sym, eig, v):
    """``(I + S_i C) x_i = v_i`` for every pixel ``i``, the left-hand side of eq. 2.

    Args:
        deg: (..., ) the degrees ``S_i`` (sum of the pixel's similarities).
        sym: (K, K) symmetric C (:func:`_block_eig`).
        eig: ``(lambda, U)`` of ``stop_gradient(sym)`` (:func:`_block_eig`).
        v: (..., K) right-hand sides.

    Returns:
        x: (..., K) in ``result_type(deg, sym, v)``, ``U ((U^T v_i) / (1 + S_i lambda))``:
        memory per pixel is the scalar ``S_i``, not a K x K inverse. Derivatives are those of
        the exact solution (``jax.lax.custom_linear_solve`` on ``x -> x + S_i C x``, symmetric):
        tangent ``(I + S_i C)^-1 (dv_i - (dS_i C + S_i dC) x_i)``, linear in ``(dS, dC, dv)``,
        reverse mode by transposition, exact at every order (unlike a ``custom_jvp`` on the
        eigendecomposed solve, whose linearisation would drop the solve's own dependence on C
        from second derivatives).
    """
    dtype = jnp.result_type(deg, sym, v)
    deg, sym, v = (a.astype(dtype) for a in (deg, sym, v))
    lam, u = (a.astype(dtype) for a in eig)
    scale = deg[..., None]

    def matvec(x):
        return x + scale * (x @ sym)

    def solve(_, b):
        return ((b @ u) / (1 + scale * lam)) @ u.T

    return jax.lax.custom_linear_solve(matvec, v, solve, symmetric=True)


# A half-update only touches the columns of one parity, and (every dx odd) reads only the
# other parity. Both live on half-width sub-grids: column 2m + p of the image is column m
# of sub-grid p. Offset (dy, dx) from target parity p lands on source column
# 2m + p + dx = 2m' + q, i.e. m' = m + (dx + p - q) / 2: a stencil between the two
# sub-grids with offsets (dy, (dx + 2p - 1) / 2), and an entry is inside the sub-grid
# exactly when it is inside the image. So the pull is one rwseg.stencil.apply on half the
# map (and its backward is stencil.apply's). An offset that maps to (0, 0) (dy = 0,
# dx = ±1) is a plain product, kept out of the stencil.


def _split_columns(a):
    """(H, W, ...) -> (even columns, odd columns): (H, ceil(W/2), ...), (H, floor(W/2), ...)."""
    return a[:, 0::2], a[:, 1::2]


def _merge_columns(even, odd):
    """Inverse of :func:`_split_columns`."""
    width = even.shape[1] + odd.shape[1]
    if odd.shape[1] < even.shape[1]:
        odd = _pad_columns(odd, even.shape[1])
    both = jnp.stack([even, odd], axis=2)  # (H, ceil(W/2), 2, ...)
    return both.reshape((both.shape[0], 2 * even.shape[1]) + both.shape[3:])[:, :width]


def _pad_columns(a, width):
    return jnp.pad(a, ((0, 0), (0, width - a.shape[1])) + ((0, 0),) * (a.ndim - 2))


def _half_pull(similarity, offsets, parity):
    """``pull(src) = sum_n s[i, n] mu[i + o_n]`` for the columns ``i`` of ``parity``.

    similarity: (H, W, N), zero on entries pointing outside the image. Returns a
    function of the other parity's sub-grid (H, W_q, K) giving (H, W_p, K). The weight
    slices are taken once here, so layers share them.
    """
    h, width, _ = similarity.shape
    w_p, w_q = (width + 1 - parity) // 2, (width + parity) // 2
    common = max(w_p, w_q)
    sub = [(dy, (dx + 2 * parity - 1) // 2) for dy, dx in offsets]
    others = [n for n, o in enumerate(sub) if o != (0, 0)]
    selfs = [n for n, o in enumerate(sub) if o == (0, 0)]
    weights = _pad_columns(similarity[:, parity::2], common)
    sub_offsets = tuple(sub[n] for n in others)
    w_others = weights if not selfs else weights[..., np.asarray(others, np.int32)]
    w_self = weights[..., selfs[0], None] if selfs else None

    def pull(src):
        if w_p == 0 or w_q == 0:
            return jnp.zeros((h, w_p) + src.shape[2:], jnp.result_type(similarity, src))
        src = _pad_columns(src, common)
        out = stencil.apply(w_others, src, sub_offsets) if sub_offsets else 0
        if w_self is not None:
            out = out + w_self * src
        return out[:, :w_p]

    return pull


def _half_update(mu_q, rhs_p, solve_p, pull, compat):
    """Eq. 2 on the columns of one parity p: ``(I + S_i C)^-1 (r_i + C sum_j s_ij mu_j)``.

    mu_q: (H, W_q, K) the other parity's columns; rhs_p: (H, W_p, K); solve_p maps
    (H, W_p, K) right-hand sides to their per-pixel block solves (:func:`_block_solve`);
    pull from :func:`_half_pull`. Returns the new (H, W_p, K).
    """
    return solve_p(rhs_p + pull(mu_q) @ compat.T)


def _half_operators(similarity, compat, offsets):
    """What the half-updates share across layers: per parity (block solve, pull).

    The block solve of parity p closes over that parity's degrees (H, W_p) and the one
    eigendecomposition of C (:func:`_block_eig`); no (H, W, K, K) map is built.
    """
    h, w = similarity.shape[:2]
    masked = jnp.where(stencil.valid_mask(h, w, offsets), similarity, jnp.zeros((), similarity.dtype))
    degree = _split_columns(stencil.degree(masked, offsets))
    sym, eig = _block_eig(compat)
    return tuple((functools.partial(_block_solve, degree[p], sym, eig), _half_pull(masked, offsets, p))
                 for p in (0, 1))


def _layer_fn(similarity, compat, offsets):
    """One GMF layer (even half-update, then odd) as a function ``(mu, rhs) -> mu``."""
    (solve_even, pull_even), (solve_odd, pull_odd) = _half_operators(similarity, compat, offsets)

    def layer(mu, rhs):
        even, odd = _split_columns(mu)
        rhs_even, rhs_odd = _split_columns(rhs)
        even = _half_update(odd, rhs_even, solve_even, pull_even, compat)
        odd = _half_update(even, rhs_odd, solve_odd, pull_odd, compat)
        return _merge_columns(even, odd)

    return layer


def _check_state(name, y, unary, similarity, compat, offsets):
    """Check a state ``y`` (H, W, K) against its problem; returns the normalised offsets."""
    offsets = _check_offsets(offsets)
    _check_scores(name, y)
    _check_scores("unary", unary)
    V.check_shape("unary", unary, y.shape, f"(H, W, K) matching {name}")
    _check_similarity(similarity, y.shape[:2], offsets)
    _check_compat(compat, y.shape[-1])
    return offsets


def gmf_half_update(mu, unary, similarity, compat, offsets, *, parity: int):
    """One GMF sub-layer (paper §4, Fig. 3): update the columns of one parity.

    Each updated column follows eq. 2, ``(I + S_i C) mu_i = r_i + C sum_j s_ij mu_j``,
    with the other parity fixed; the other columns are returned unchanged. This is the
    exact minimiser of :func:`energy` over the updated block. :func:`gmf` runs these
    (sharing the eigendecomposition of C that solves the per-pixel blocks).

    Args:
        mu: (H, W, K) float current estimate.
        unary: (H, W, K) float unary scores r.
        similarity: (H, W, N) float similarity s on ``offsets``.
        compat: (K, K) float class compatibility C.
        offsets: N bipartite, symmetric offsets ``(dy, dx)``.
        parity: 0 updates the even columns (0, 2, ...), 1 the odd ones.

    Returns:
        (H, W, K) in the common dtype of the inputs.
    """
    offsets = _check_state("mu", mu, unary, similarity, compat, offsets)
    if parity not in (0, 1):
        raise ValueError(f"parity: expected 0 (even columns) or 1 (odd columns), got {parity!r}")
    solve, pull = _half_operators(similarity, compat, offsets)[parity]
    halves = list(_split_columns(mu))
    halves[parity] = _half_update(halves[1 - parity], _split_columns(unary)[parity], solve, pull, compat)
    return _merge_columns(*halves)


def _max_abs(a):
    return jnp.max(jnp.abs(a))


def _info(matvec, rhs, mu, layers, converged):
    res = jnp.sqrt(jnp.sum((rhs - matvec(mu)) ** 2, axis=(0, 1)))
    norm = jnp.sqrt(jnp.sum(rhs**2, axis=(0, 1)))
    rel = jnp.where(norm > 0, safe_divide(res, norm), res)
    return linsolve.SolveInfo(rel, jnp.asarray(layers, jnp.int32), jnp.broadcast_to(converged, rel.shape))


def gmf(
    unary,
    similarity,
    compat,
    offsets,
    *,
    num_steps: int | None = None,
    tol: float = 1e-5,
    max_iters: int = 1000,
    return_info: bool = False,
    checked: bool = False,
    remat: bool = False,
):
    """Gaussian mean-field inference on a bipartite stencil (paper eq. 2, §3.2, §4).

    Starts from ``mu = r``; one layer updates every even column, then every odd column,
    with ``(I + S_i C) mu_i = r_i + C sum_j s_ij mu_j``. ``num_steps=n`` runs exactly n
    layers (``lax.scan``; reverse-mode differentiable, the paper's unrolled GMF network,
    5 layers). ``num_steps=None`` iterates in a ``lax.while_loop`` until a layer changes no
    entry by more than ``tol * max|r|`` or ``max_iters`` layers ran, and is differentiated
    implicitly as the solution of ``(I + L_s ⊗ C) y = r`` (backward pass: the same
    iteration on the cotangent). ``tol`` bounds the change of the last layer, not the
    error: the error can be larger by the factor ``1 / (1 - rate)`` of a slowly converging
    iteration (strong similarities); check ``info.residual``.

    Checks: ``compat`` must be finite, symmetric and positive semidefinite, and
    ``similarity`` finite and symmetric (``s[i, o] == s[i + o, -o]`` on entries inside the
    image, as :func:`pairwise_similarity` makes it; relative tolerance 1e-5): the
    converged iteration and its implicit gradient rely on both (a non-symmetric
    similarity gives a wrong gradient, a non-PSD compat singular blocks). Concrete
    inputs that fail raise ``ValueError`` naming the argument. Under ``jit`` pass
    ``checked=True`` and wrap the call in ``checkify.checkify`` to get the same errors;
    unchecked, the converged GMF (``num_steps=None``) returns NaN everywhere with
    ``converged=False`` for such values, and for a NaN/inf ``unary`` or an iteration that
    overflows (never a stale iterate).

    Args:
        unary: (H, W, K) float unary scores r.
        similarity: (H, W, N) float similarity s on ``offsets`` (e.g.
            :func:`pairwise_similarity` on :func:`bipartite_offsets`).
        compat: (K, K) float class compatibility C, symmetric PSD (e.g.
            :func:`compatibility`).
        offsets: N bipartite (every dx odd), symmetric offsets ``(dy, dx)``.
        num_steps: exact number of GMF layers (Python int), or ``None`` to iterate to
            convergence.
        tol: convergence threshold of the iterated GMF, relative to ``max|r|`` (a Python
            or numpy scalar). Unused with ``num_steps``.
        max_iters: cap on the layers of the iterated GMF.
        return_info: also return a :class:`rwseg.linsolve.SolveInfo`.
        checked: add ``checkify`` value checks for traced inputs.
        remat: with ``num_steps``, checkpoint each layer (``jax.checkpoint``): the
            backward pass keeps only the iterate between layers and recomputes a layer's
            intermediates (``config.remat``, :mod:`rwseg.layers.memory`). Same values
            and gradients. Unused without ``num_steps``.

    Returns:
        y: (H, W, K) in the common dtype of the inputs; with ``return_info=True`` the pair
            ``(y, info)``, ``info`` a :class:`rwseg.linsolve.SolveInfo` (relative residual of
            the system per class, layers run, converged = the tolerance test passed; not
            differentiable).
    """
    offsets = _check_offsets(offsets)
    _check_scores("unary", unary)
    _check_similarity(similarity, unary.shape[:2], offsets)
    _check_compat(compat, unary.shape[-1], checked)
    _check_similarity_values(similarity, offsets, checked)
    max_iters = V.check_nonnegative_int("max_iters", max_iters, positive=True)
    # Python or numpy scalars (np.float32(1e-5)); numbers.Real excludes arrays and bool is refused
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= float(tol) < math.inf:
        raise ValueError(f"tol: expected a finite float >= 0 (Python or numpy scalar), got {tol!r}")
    if num_steps is not None:
        num_steps = V.check_nonnegative_int("num_steps", num_steps)
    y, info = _gmf_core(unary, similarity, compat, offsets, num_steps, float(tol), max_iters, bool(return_info),
                        bool(remat))
    if num_steps is None and not (V.is_concrete(similarity) and V.is_concrete(compat)):
        # traced and unchecked values: an asymmetric / non-finite similarity or a non-PSD
        # compat makes the implicit gradient (or the iteration) wrong, so say it with NaN
        # (a factor, not a where: the gradient must be NaN too, not a plausible zero)
        ok = _values_ok(similarity, compat, offsets)
        y = y * jnp.where(ok, 1, jnp.nan).astype(y.dtype)
        info = info._replace(converged=info.converged & ok)
    return (y, info) if return_info else y


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8))  # compiled once per shape and setting
def _gmf_core(unary, similarity, compat, offsets, num_steps, tol, max_iters, want_info, remat=False):
    """gmf after the checks: returns (y, info), info None unless want_info for unrolled layers."""
    dtype = jnp.result_type(unary, similarity, compat)
    unary, similarity, compat = (a.astype(dtype) for a in (unary, similarity, compat))
    layer = _layer_fn(similarity, compat, offsets)
    matvec = system_matvec(similarity, compat, offsets)

    if num_steps is not None:
        def body(carry, _):
            mu, _ = carry
            new = layer(mu, unary)
            return (new, _max_abs(new - mu)), None

        if remat:  # save the carry only; a layer's intermediates are recomputed in the backward pass
            body = jax.checkpoint(body)
        init = (unary, jnp.asarray(jnp.inf, dtype))
        (y, delta), _ = jax.lax.scan(body, init, None, length=num_steps)
        if not want_info:
            return y, None
        info = _info(matvec, unary, y, num_steps, delta <= tol * _max_abs(unary))
        return y, jax.tree_util.tree_map(jax.lax.stop_gradient, info)

    def solve(_, rhs):
        threshold = tol * _max_abs(rhs)

        def cond(state):
            _, delta, it = state
            return (it < max_iters) & (delta > threshold)

        def body(state):
            mu, _, it = state
            new = layer(mu, rhs)
            return new, _max_abs(new - mu), it + 1

        init = (rhs, jnp.asarray(jnp.inf, rhs.dtype), jnp.zeros((), jnp.int32))
        mu, delta, it = jax.lax.while_loop(cond, body, init)
        # NaN/inf in rhs (threshold), or produced by a layer (delta): the loop stops at once;
        # return NaN everywhere, never the stale iterate (delta is finite after any layer
        # that produced finite values, and inf only when no layer ran)
        broken = ~jnp.isfinite(delta) | ~jnp.isfinite(threshold)
        mu = jnp.where(broken, jnp.asarray(jnp.nan, mu.dtype), mu)
        return mu, _info(matvec, rhs, mu, it, delta <= threshold)

    return linsolve.implicit_solve(matvec, unary, solve, symmetric=True)


# --------------------------------------------------------------------------- energy and losses


def energy(y, unary, similarity, compat, offsets):
    """The GCRF energy (paper eq. 1).

    ``sum_i ||y_i - r_i||^2 + sum_{unordered pairs} s_ij (y_i - y_j)^T C (y_i - y_j)``.
    Every unordered pair appears twice on a symmetric stencil, so the pairwise sum is half
    the sum over all (pixel, offset) entries inside the image. Memory O(H·W·K) (one offset
    at a time).

    Args:
        y: (H, W, K) float state.
        unary: (H, W, K) float unary scores r.
        similarity: (H, W, N) float similarity s on ``offsets``.
        compat: (K, K) float class compatibility C.
        offsets: N symmetric bipartite offsets ``(dy, dx)``.

    Returns:
        A scalar in the common dtype of the inputs.
    """
    offsets = _check_state("y", y, unary, similarity, compat, offsets)
    h, w = y.shape[:2]
    valid = stencil.valid_mask(h, w, offsets)
    total = jnp.sum((y - unary) ** 2)
    for n, o in enumerate(offsets):
        d = y - stencil.shift(y, o)
        quad = jnp.einsum("hwk,kl,hwl->hw", d, compat, d)
        total = total + 0.5 * jnp.sum(jnp.where(valid[:, :, n], similarity[:, :, n] * quad, 0))
    return total


def margin_loss(y, labels, *, margin: float = 0.5, ignore_index: int = IGNORE_INDEX, checked: bool = False):
    """Multi-class hinge loss (paper eq. 6), averaged over labelled pixels.

    Per pixel ``max(0, T - (y_l - max_{k != l} y_k))`` with ``T = margin``. Labels other
    than ``[0, K)`` and ``ignore_index`` raise ``ValueError`` when labels are concrete;
    under ``jit`` pass ``checked=True`` inside ``checkify.checkify``; unchecked they are
    ignored.

    Args:
        y: (H, W, K) float scores, K >= 2.
        labels: (H, W) int in ``[0, K)`` or ``ignore_index``.
        margin: the margin T.
        ignore_index: label value of unlabelled pixels.
        checked: add ``checkify`` value checks for traced labels.

    Returns:
        A scalar in y's dtype (0 when no pixel is labelled).
    """
    _check_scores("y", y)
    num_classes = y.shape[-1]
    if num_classes < 2:
        raise ValueError(f"y: expected K >= 2 classes, got shape {tuple(y.shape)}")
    labels = _check_labels(labels, y.shape[:2], num_classes, ignore_index, checked)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    safe = jnp.where(valid, labels, 0)
    onehot = jax.nn.one_hot(safe, num_classes, dtype=bool)
    true_score = jnp.sum(jnp.where(onehot, y, 0), axis=-1)
    best_other = jnp.max(jnp.where(onehot, -jnp.inf, y), axis=-1)
    per_pixel = jnp.maximum(margin - (true_score - best_other), 0)
    return masked_mean(per_pixel, valid)


def similarity_pretrain_loss(similarity, labels, offsets, *, threshold: float = math.exp(-10),
                             ignore_index: int = IGNORE_INDEX):
    """Pairwise pretraining loss (paper eq. 7), averaged over labelled pairs.

    Per pair ``-[l_i = l_j] s_ij + [l_i != l_j] max(0, s_ij - h)``, ``h = threshold``
    (the extracted eq. 7 shows min; the stated intent, pushing s below h for dissimilar
    pairs, needs max — docs/methods.md §4). Pairs with a negative or ``ignore_index``
    label, or a neighbour outside the image, are excluded
    (:func:`rwseg.stencil.label_affinity`).

    Args:
        similarity: (H, W, N) float similarity s on ``offsets``.
        labels: (H, W) int labels.
        offsets: N neighbour offsets ``(dy, dx)``.
        threshold: the similarity bound h for dissimilar pairs.
        ignore_index: label value excluded from the loss.

    Returns:
        A scalar in similarity's dtype (0 when no pair is valid).
    """
    offsets = stencil.as_offsets(offsets)
    V.check_rank("similarity", similarity, 3, "(H, W, N)")
    V.check_floating("similarity", similarity)
    V.check_rank("labels", labels, 2, "(H, W)")
    V.check_integer("labels", labels)
    V.check_shape("labels", labels, similarity.shape[:2], "(H, W) matching similarity")
    _check_similarity(similarity, similarity.shape[:2], offsets)
    same, valid = stencil.label_affinity(labels, offsets, ignore_index=ignore_index)
    same = same > 0.5
    per_pair = jnp.where(same, -similarity, jnp.maximum(similarity - threshold, 0))
    return masked_mean(per_pair, valid)
