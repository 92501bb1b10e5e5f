"""Matrix-free Krylov solvers with implicit (adjoint-solve) gradients.

The linear systems of rwseg (RWN's converged walk, RAWKS' hitting probabilities,
GCRF's mean-field fixed point; ``docs/methods.md`` §1, §2, §4) all have the
form ``A x = b`` where ``A`` is a stencil operator that is never built as a matrix.
This module solves them:

- :func:`cg` — preconditioned conjugate gradients, for symmetric positive definite ``A``;
- :func:`bicgstab` — preconditioned BiCGStab, for nonsymmetric ``A``;
- :func:`jacobi` — the diagonal (Jacobi) preconditioner;
- :func:`implicit_solve` — wraps any forward solver (e.g. a block Gauss-Seidel
  ``while_loop``) so that it is differentiated implicitly.

Conventions
-----------
``matvec`` maps an array shaped like ``b`` to an array shaped like ``b`` and must be
linear. For ``b`` of rank >= 2 the **last axis holds independent right-hand sides**
(channels): ``matvec`` must act on every channel independently (as every stencil
operator of :mod:`rwseg.stencil` does), and every channel gets its own step sizes,
its own stopping test and its own entry in :class:`SolveInfo`. A rank-0/1 ``b`` is one
right-hand side and :class:`SolveInfo` holds scalars.

Stopping test per right-hand side: ``||b - A x|| <= max(tol * ||b||, atol)`` (2-norms),
or ``max_iters`` iterations. A solve that stops at ``max_iters`` is *not* an error
(it cannot be under ``jit``): check ``info.converged`` / ``info.residual``.

Non-finite values: a right-hand side holding NaN/inf, an operator (``matvec``) whose
output is NaN/inf, or a residual that becomes non-finite (overflow, breakdown) ends the
solve of that right-hand side with ``converged=False`` and an **all-NaN** ``x`` for it
(never a plausible zero or a stale iterate). The final residual check runs ``matvec``
on the returned ``x`` even when no iteration ran, so a NaN operator is caught for
``b = 0`` too.

Gradients
---------
Every solver is wrapped in ``jax.lax.custom_linear_solve``: the derivative of
``x = A^{-1} b`` with respect to ``b`` and to everything ``matvec`` closes over is
``dx = A^{-1}(db - dA x)`` (forward mode) and one solve with ``A^T`` (reverse mode). The
Krylov loops are ``lax.while_loop`` and are never differentiated or unrolled. The
tangent / adjoint solve uses the same ``tol``, ``atol`` and ``max_iters`` relative to its
own right-hand side; its :class:`SolveInfo` is not returned (aux outputs carry no
gradient). Whatever ``preconditioner`` closes over gets no gradient (it only changes the
path to the solution, not the solution).

dtype: the computation runs in ``b``'s dtype (float32 stays float32 with
``jax_enable_x64`` on).
"""

from __future__ import annotations

import numbers
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rwseg._numerics import channel_scale, safe_divide

__all__ = ["SolveInfo", "cg", "bicgstab", "jacobi", "implicit_solve"]

MatVec = Callable[[jnp.ndarray], jnp.ndarray]
Preconditioner = Callable[[jnp.ndarray], jnp.ndarray]


class SolveInfo(NamedTuple):
    """Diagnostics of a solve, one entry per right-hand side (``b.shape[-1:]``, or scalars).

    The ``info`` of every rwseg operator called with ``return_info=True`` is a
    ``SolveInfo`` or a NamedTuple that contains one (:class:`rwseg.rawks.RawksInfo`).
    An operator run for an exact number of steps (``num_steps=n``) reports
    ``residual = 0``, ``iterations = n`` and ``converged = True``.

    Attributes:
        residual: relative residual ``||b - A x|| / ||b||`` of the returned ``x``, recomputed
            with one extra ``matvec`` at the end (not the recurrence estimate); ``||b - A x||``
            itself where ``b = 0``. Floating, shape ``b.shape[-1:]`` (or scalar).
        iterations: int32 scalar, iterations run (the loop runs until every right-hand side
            has converged).
        converged: bool, ``||b - A x|| <= max(tol ||b||, atol)`` for the returned ``x``.
    """

    residual: jnp.ndarray
    iterations: jnp.ndarray
    converged: jnp.ndarray


# --------------------------------------------------------------------------- helpers


def _dot(a, b):
    if a.ndim < 2:
        return jnp.sum(a * b)
    # per-channel inner products as one (N, C) x (N, C) -> (C,) contraction: measured ~10 %
    # faster per CG iteration on XLA CPU than a multiply-and-reduce over the leading axes
    c = a.shape[-1]
    return jnp.einsum("nc,nc->c", a.reshape(-1, c), b.reshape(-1, c), precision=jax.lax.Precision.HIGHEST)


def _norm(a):
    return jnp.sqrt(_dot(a, a))


def _bcast(s, x):
    """Broadcast per-channel scalars ``s`` (shape x.shape[-1:] or ()) against ``x``."""
    return s if x.ndim < 2 else s.reshape((1,) * (x.ndim - 1) + s.shape)


_div = safe_divide  # a / b with 0 where b == 0 (frozen or broken-down right-hand sides)


def _check_b(b):
    b = jnp.asarray(b)
    if not jnp.issubdtype(b.dtype, jnp.floating):
        raise TypeError(f"b: expected a floating-point right-hand side, got dtype {b.dtype} (shape {b.shape})")
    return b


def _check_params(tol, atol, max_iters):
    if isinstance(max_iters, bool) or not isinstance(max_iters, numbers.Integral) or max_iters < 1:
        raise ValueError(f"max_iters: expected a Python int >= 1, got {max_iters!r}")
    for name, v in (("tol", tol), ("atol", atol)):
        # numbers.Real covers Python and numpy scalars (np.float32(1e-5)); arrays are refused
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0 <= float(v) < float("inf")):
            raise ValueError(f"{name}: expected a finite float >= 0 (Python or numpy scalar), got {v!r}")
    return float(tol), float(atol), int(max_iters)


def _check_like_b(name, what, shape_dtype, b):
    """Raise ``ValueError`` unless ``shape_dtype`` (an array or ShapeDtypeStruct) is shaped like ``b``."""
    shape = tuple(getattr(shape_dtype, "shape", ()))
    if shape != tuple(b.shape):
        raise ValueError(f"{name}: expected {what} shaped like b {tuple(b.shape)}, got shape {shape}")


def _check_operators(b, matvec, preconditioner, x0):
    """Shape checks of x0, matvec(b) and preconditioner(b) (abstract evaluation, no FLOPs)."""
    if x0 is not None:
        x0 = jnp.asarray(x0)
        _check_like_b("x0", "a warm start", x0, b)
        if not jnp.issubdtype(x0.dtype, jnp.floating):
            raise TypeError(f"x0: expected a floating-point warm start, got dtype {x0.dtype}")
    if not callable(matvec):
        raise TypeError(f"matvec: expected a callable, got {type(matvec).__name__}")
    _check_like_b("matvec", "a linear map returning an array", _eval_shape_named("matvec", matvec, b), b)
    if preconditioner is not None:
        if not callable(preconditioner):
            raise TypeError(f"preconditioner: expected a callable v -> M^-1 v, got {type(preconditioner).__name__}")
        _check_like_b("preconditioner", "a map v -> M^-1 v returning an array",
                      _eval_shape_named("preconditioner", preconditioner, b), b)


def _eval_shape_named(name, f, b):
    """``jax.eval_shape(f, b)``; a shape or dtype error inside ``f`` is re-raised naming ``name``.

    E.g. a :func:`jacobi` diagonal that does not broadcast against ``b`` fails inside jax's
    ``mul`` with a message that names neither the argument nor the shapes the solver expects.
    """
    try:
        return jax.eval_shape(f, b)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a map of arrays shaped like b {tuple(b.shape)} (dtype {b.dtype}), "
                         f"but applying it to b failed: {e}") from e


def _threshold(rhs, tol, atol):
    dt = rhs.dtype
    return jnp.maximum(jnp.asarray(tol, dt) * _norm(rhs), jnp.asarray(atol, dt))


# The Krylov loops update their residual recursively, and in floating point it drifts from the
# true residual b - A x, which alone decides ``converged`` (:func:`_finish`). Stopping exactly at
# the threshold left the true residual just above it: converged RWN walks on Stanford photos
# (float32, tol 1e-5) stopped at a recursive 1e-5 with a true 1.00-1.05e-5, so 83 % of them were
# reported as not converged. The loops aim at this fraction of the threshold instead (in CG about
# one more iteration); ``converged`` still tests the true residual against the threshold itself.
LOOP_MARGIN = 0.5


def _loop_threshold(rhs, tol, atol):
    return jnp.asarray(LOOP_MARGIN, rhs.dtype) * _threshold(rhs, tol, atol)


def _nan_where_nonfinite(x, rn):
    """NaN for every right-hand side whose residual norm ``rn`` is not finite."""
    return jnp.where(_bcast(jnp.isfinite(rn), x), x, jnp.asarray(jnp.nan, x.dtype))


def _finish(matvec, rhs, x, iters, tol, atol):
    # The product runs in a branch of a (always taken) cond so that XLA compiles it on its own,
    # as in the loop body: fused with the residual norm's reduction, XLA CPU split a stencil
    # product into one materialised window per offset feeding the reduce, and this one product
    # cost several loop iterations (converged RWN walk, 128x128x24, K = 80;
    # docs/benchmarks/random_walks.md). An optimization barrier did not prevent that fusion.
    r = rhs - jax.lax.cond(iters >= 0, matvec, jnp.zeros_like, x)
    rn, bn = _norm(r), _norm(rhs)
    # a NaN/inf right-hand side, operator output or iterate: NaN out, converged False
    x = _nan_where_nonfinite(x, rn)
    info = SolveInfo(
        residual=jnp.where(bn > 0, _div(rn, bn), rn),
        iterations=iters.astype(jnp.int32),
        converged=rn <= _threshold(rhs, tol, atol),
    )
    return x, info


def _warm_start(x0, b):
    """Initial guess for a right-hand side ``rhs`` from the warm start ``x0`` of ``b``.

    The solver function is also used for tangent / adjoint right-hand sides, for which
    ``x0`` is meaningless. We start from ``c x0`` with ``c = <rhs, b> / <b, b>`` per
    channel: exactly ``x0`` for ``rhs = b``, and for other right-hand sides the initial
    residual is never (much) larger than ``||rhs||``.
    """
    if x0 is None:
        return lambda rhs: None  # the loops start from zero without a product
    x0 = jax.lax.stop_gradient(jnp.asarray(x0, b.dtype))
    b0 = jax.lax.stop_gradient(b)
    bb = _dot(b0, b0)
    return lambda rhs: _bcast(_div(_dot(rhs, b0), bb), rhs) * x0


def _identity(v):
    return v


# --------------------------------------------------------------------------- CG


def _rescaled(loop):
    """Run a Krylov ``loop`` on ``A y = rhs / s`` and return ``x = s y``, ``s = max |rhs|`` per channel.

    Krylov inner products square the entries: without rescaling, a right-hand side below
    about ``sqrt(finfo.tiny)`` (1e-19 in float32, 1e-154 in float64) gives zero norms and
    the loop returns ``x = 0`` as "converged", and one above ``sqrt(finfo.max)`` overflows
    to a non-finite residual. ``A`` is linear and acts on every channel independently, so
    the rescaled solve is exact; ``atol`` is rescaled with it, and relative residuals do
    not change. A zero or non-finite scale is left at 1 (``b = 0`` stays 0, NaN stays NaN).
    """

    def run(matvec, rhs, x_init, *, atol, **kw):
        s = channel_scale(rhs)
        sb = _bcast(s, rhs)
        x_init = None if x_init is None else x_init / sb
        y, info = loop(matvec, rhs / sb, x_init, atol=jnp.asarray(atol, rhs.dtype) / s, **kw)
        return y * sb, info

    return run


@_rescaled
def _cg_loop(matvec, rhs, x_init, *, tol, atol, max_iters, preconditioner):
    M = preconditioner or _identity
    thresh = _loop_threshold(rhs, tol, atol)
    x = x_init
    r = rhs if x is None else rhs - matvec(x)  # no product with the zero start
    x = jnp.zeros_like(rhs) if x is None else x
    z = M(r)
    p = z
    rz = _dot(r, z)

    def cond(state):
        rn, k = state[4], state[5]
        return (k < max_iters) & jnp.any(rn > thresh)

    def body(state):
        x, r, p, rz, rn, k = state
        active = rn > thresh
        ap = matvec(p)
        alpha = jnp.where(active, _div(rz, _dot(p, ap)), 0)
        x = x + _bcast(alpha, x) * p
        r = r - _bcast(alpha, r) * ap
        z = M(r)
        rz_new = _dot(r, z)
        beta = _div(rz_new, rz)
        p = z + _bcast(beta, p) * p
        rn_new = rz_new if preconditioner is None else _dot(r, r)  # squared norms
        return x, r, p, rz_new, jnp.sqrt(rn_new), k + 1

    state = (x, r, p, rz, _norm(r), jnp.zeros((), jnp.int32))
    x, r, _, _, _, k = jax.lax.while_loop(cond, body, state)
    return _finish(matvec, rhs, x, k, tol, atol)


def cg(
    matvec: MatVec,
    b,
    *,
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iters: int = 1000,
    preconditioner: Optional[Preconditioner] = None,
    x0=None,
):
    """Solve ``A x = b`` for symmetric positive definite ``A`` by preconditioned CG.

    Differentiable in ``b`` and in everything ``matvec`` closes over by implicit
    differentiation (the backward pass is one more CG solve with the same operator).

    Args:
        matvec: linear map, array shaped like ``b`` -> same shape (e.g. (H, W, C) ->
            (H, W, C)), acting on every channel (last axis) independently; must be
            symmetric positive definite (not checked: an indefinite operator shows as
            ``converged=False``).
        b: (..., C) float right-hand sides (one per channel), or a rank-0/1 single
            right-hand side.
        tol: relative tolerance: stop when ``||b - A x|| <= max(tol ||b||, atol)`` per channel.
        atol: absolute tolerance of the same test.
        max_iters: iteration cap (Python int).
        preconditioner: ``v -> M^{-1} v`` with ``M`` SPD and channel-wise (e.g. :func:`jacobi`).
        x0: optional warm start shaped like ``b`` (no gradient flows into it).

    Returns:
        ``(x, info)``: ``x`` shaped like ``b`` in ``b``'s dtype; ``info`` a :class:`SolveInfo`.
    """
    b = _check_b(b)
    tol, atol, max_iters = _check_params(tol, atol, max_iters)
    _check_operators(b, matvec, preconditioner, x0)
    start = _warm_start(x0, b)

    def solve(mv, rhs):
        return _cg_loop(mv, rhs, start(rhs), tol=tol, atol=atol, max_iters=max_iters,
                        preconditioner=preconditioner)

    return jax.lax.custom_linear_solve(matvec, b, solve, symmetric=True, has_aux=True)


# --------------------------------------------------------------------------- BiCGStab


@_rescaled
def _bicgstab_loop(matvec, rhs, x_init, *, tol, atol, max_iters, preconditioner):
    M = preconditioner or _identity
    thresh = _loop_threshold(rhs, tol, atol)
    r = rhs if x_init is None else rhs - matvec(x_init)  # no product with the zero start
    x = jnp.zeros_like(rhs) if x_init is None else x_init
    rhat = r
    one = jnp.ones(r.shape[-1:] if r.ndim >= 2 else (), r.dtype)
    zeros = jnp.zeros_like(r)

    def cond(state):
        k, r = state[0], state[2]
        return (k < max_iters) & jnp.any(_norm(r) > thresh)

    def body(state):
        k, x, r, p, v, rho, alpha, omega = state
        active = _norm(r) > thresh
        rho_new = _dot(rhat, r)
        beta = _div(rho_new, rho) * _div(alpha, omega)
        p = r + _bcast(beta, p) * (p - _bcast(omega, v) * v)
        phat = M(p)
        v = matvec(phat)
        alpha = jnp.where(active, _div(rho_new, _dot(rhat, v)), 0)
        s = r - _bcast(alpha, v) * v
        shat = M(s)
        t = matvec(shat)
        omega = jnp.where(active, _div(_dot(t, s), _dot(t, t)), 0)
        x = x + _bcast(alpha, x) * phat + _bcast(omega, x) * shat
        r = s - _bcast(omega, t) * t
        return k + 1, x, r, p, v, rho_new, alpha, omega

    state = (jnp.zeros((), jnp.int32), x, r, zeros, zeros, one, one, one)
    k, x = jax.lax.while_loop(cond, body, state)[:2]
    return _finish(matvec, rhs, x, k, tol, atol)


def bicgstab(
    matvec: MatVec,
    b,
    *,
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iters: int = 1000,
    preconditioner: Optional[Preconditioner] = None,
    x0=None,
    transpose_matvec: Optional[MatVec] = None,
):
    """Solve ``A x = b`` for a general nonsingular ``A`` by right-preconditioned BiCGStab.

    The adjoint solve (reverse mode) runs BiCGStab on ``A^T``: ``transpose_matvec`` if
    given, else the transpose of ``matvec`` derived by ``jax.linear_transpose``. The same
    ``preconditioner`` is used for ``A^T`` (exact for diagonal preconditioners such as
    :func:`jacobi`). BiCGStab can break down or stagnate on hard problems; that shows as
    ``info.converged == False``, never as NaN (breakdown divisions are guarded); NaN comes
    out only for non-finite input or operator output (module docstring).

    Args:
        matvec: linear map, array shaped like ``b`` -> same shape, acting on every channel
            independently; need not be symmetric.
        b: (..., C) float right-hand sides, or a rank-0/1 single right-hand side.
        tol: relative tolerance, as in :func:`cg`.
        atol: absolute tolerance, as in :func:`cg`.
        max_iters: iteration cap (Python int).
        preconditioner: ``v -> M^{-1} v``, channel-wise (e.g. :func:`jacobi`).
        x0: optional warm start shaped like ``b`` (no gradient flows into it).
        transpose_matvec: optional ``A^T`` for the adjoint solve.

    Returns:
        ``(x, info)``: ``x`` shaped like ``b`` in ``b``'s dtype; ``info`` a :class:`SolveInfo`.
    """
    b = _check_b(b)
    tol, atol, max_iters = _check_params(tol, atol, max_iters)
    _check_operators(b, matvec, preconditioner, x0)
    start = _warm_start(x0, b)
    kw = dict(tol=tol, atol=atol, max_iters=max_iters, preconditioner=preconditioner)

    def solve(mv, rhs):
        return _bicgstab_loop(mv, rhs, start(rhs), **kw)

    def transpose_solve(vecmat, rhs):
        return _bicgstab_loop(transpose_matvec or vecmat, rhs, None, **kw)

    return jax.lax.custom_linear_solve(matvec, b, solve, transpose_solve=transpose_solve, has_aux=True)


# --------------------------------------------------------------------------- others


def jacobi(diagonal) -> Preconditioner:
    """The Jacobi preconditioner ``v -> v / diagonal``.

    Args:
        diagonal: float, the diagonal of ``A``, shaped like the vectors (e.g. (H, W, C)) or
            broadcastable to them (e.g. (H, W, 1) for an operator shared by all channels).
            It must be nonzero (positive for :func:`cg`).

    Returns:
        A function ``v -> M^{-1} v`` keeping ``v``'s shape and dtype.
    """
    diagonal = jnp.asarray(diagonal)
    if not jnp.issubdtype(diagonal.dtype, jnp.floating):
        raise TypeError(f"diagonal: expected a floating-point array, got dtype {diagonal.dtype}")
    inv = 1 / diagonal
    return lambda v: v * inv.astype(v.dtype)


def implicit_solve(
    matvec: MatVec,
    b,
    solve: Callable[[MatVec, jnp.ndarray], tuple],
    *,
    transpose_solve: Optional[Callable[[MatVec, jnp.ndarray], tuple]] = None,
    symmetric: bool = False,
):
    """Differentiate an arbitrary forward solver of ``A x = b`` implicitly.

    Gradients with respect to ``b`` and to what ``matvec`` closes over are those of the
    exact solution (``jax.lax.custom_linear_solve``).

    Args:
        matvec: the linear map ``A`` (shaped like ``b`` -> shaped like ``b``).
        b: float right-hand side(s).
        solve: ``solve(matvec, rhs) -> (x, info)`` returning an (approximate) ``A^{-1} rhs``
            and any auxiliary pytree (e.g. a :class:`SolveInfo`); it may be a
            ``lax.while_loop`` (block Gauss-Seidel, mean field) that is not differentiable
            itself. It is called on ``b`` and, in forward mode, on tangent right-hand sides.
        transpose_solve: ``transpose_solve(vecmat, rhs) -> (x, info)`` solving
            ``A^T x = rhs`` (``vecmat`` is ``A^T``, derived by JAX); defaults to ``solve``
            when ``symmetric=True``. Required for reverse mode of a nonsymmetric ``A``.
        symmetric: promise that ``A = A^T``.

    Returns:
        ``(x, info)`` from ``solve``.
    """
    b = _check_b(b)
    if transpose_solve is None and not symmetric:
        raise ValueError(
            "transpose_solve: expected a solver for A^T (needed for reverse-mode gradients) "
            "when symmetric=False, got None; pass symmetric=True if A is symmetric"
        )
    return jax.lax.custom_linear_solve(
        matvec, b, solve, transpose_solve=transpose_solve, symmetric=symmetric, has_aux=True
    )
