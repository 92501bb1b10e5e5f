"""RAWKS — random-walk label propagation from sparse labels.

Vernaza & Chandraker, *Learning Random-Walk Label Propagation for Weakly-Supervised
Semantic Segmentation* (CVPR 2017); "the paper" below. Math: ``docs/methods.md`` §2. Boundary scores ``B >= 0`` (H, W) and scribbles
(seeds) define, per label ``l``, the hitting weights ``Z[x, l]`` of a 4-connected walk
that pays ``exp(-B)/4`` per step and stops at the first labelled pixel (paper eq. 5-7);
``P = Z / sum_l Z`` (eq. 8) is the propagated label distribution, differentiable in ``B``
(eq. 9-10), and eq. 11 trains a segmentation network on it with uncertainty weights.

Numerics (the reading rwseg uses)
---------------------------------
Per label, the paper's system on the unlabelled pixels is ``diag(4 e^B) - adjacency``
(eq. 7), symmetric positive definite. rwseg solves it in its symmetric Jacobi scaling,
for ``u = 2 e^{B/2} Z``::

    u[x] - sum_{x' ~ x unlabelled} e^{-(B(x) + B(x'))/2} / 4 * u[x']
         = e^{-B(x)/2} / 2 * #{x' ~ x labelled l}                    (x unlabelled)
    u[x] = [label(x) = l]                                            (x labelled)

(unit diagonal, couplings in (0, 1/4], no overflow for any finite B), all L labels as L
right-hand sides of one conjugate-gradient solve (:func:`rwseg.linsolve.cg`); the
gradient in ``B`` is one more CG solve with the same matrix (eq. 9-10, through
``jax.lax.custom_linear_solve``). ``P = u / sum_l u`` (the factor ``2 e^{B/2}`` is common to
all labels of a pixel).

Two cases need care:

- **No label reachable.** On the 4-connected grid every unlabelled pixel reaches some
  seed as soon as there is one seed (a connected component of unlabelled pixels that is
  not the whole image borders a labelled pixel). So "no label reachable" means "no seed
  at all"; it is decided exactly from the seed count, never from the size of ``Z``.
  ``P`` is uniform there and ``reachable`` is False (weight 0 in
  :func:`uncertainty_weights`).
- **Small Z.** ``Z`` decays like ``e^{-sum B}`` along paths (about 1/18 per pixel for B
  uniform in [0, 3]), and a Krylov solve stopped at a relative residual ``tol`` only
  resolves ``u`` to an *absolute* accuracy of about ``tol`` times its largest value: in a
  typical 3 %-seeded image, 15 % of the pixels then get a wrong P. rwseg therefore
  refines: CG solves of ``A du = b - A u`` are repeated until the pixelwise relative
  residual ``|b - A u|[x, l] / sum_l' (|A| |u| + |b|)[x, l']`` is below ``tol`` at every pixel (the residual of a
  local stencil operator is computed to relative precision even where ``u`` is tiny), so
  P is accurate wherever ``u`` is a normal float. Only where ``u`` is below
  ``finfo.tiny / finfo.eps`` (about 1e-31 in float32, e.g. tens of pixels behind B = 3,
  or a few pixels behind B = 30) does ``P`` fall back to the log-domain
  (zero-temperature) approximation ``P_l ∝ exp(-phi_l)``, ``phi_l`` the cost of the
  cheapest path to a seed of label ``l`` with the per-pixel cost
  ``m(B) = arccosh(2 e^B - 1)`` (:func:`step_cost`, the exact decay rate of the walk on a
  uniform-B lattice; :func:`path_costs`). These pixels are flagged ``approximate`` in
  :class:`RawksInfo` and get no gradient. The fallback is decided by float range, not by
  a threshold relative to the seeds' values, and it never turns a reachable pixel uniform.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rwseg import _validate as V
from rwseg import linsolve, stencil

__all__ = [
    "RawksInfo",
    "hitting_probabilities",
    "step_cost",
    "path_costs",
    "uncertainty_weights",
    "rawks_loss",
]

_FOUR = stencil.four_connected()


class RawksInfo(NamedTuple):
    """Diagnostics of :func:`hitting_probabilities` (``return_info=True``).

    Attributes:
        reachable: (H, W) bool, False where no label is reachable (no seed at all; P uniform).
        approximate: (H, W) bool, True where ``u`` underflows (below ``finfo.tiny / finfo.eps``)
            and P is the log-domain path-cost approximation (no gradient there).
        solve: :class:`rwseg.linsolve.SolveInfo` of the forward solve, one entry per label:
            ``residual`` is the largest componentwise relative residual over the pixels that
            are not ``approximate``, ``iterations`` the total CG iterations over all refinements.
    """

    reachable: jnp.ndarray
    approximate: jnp.ndarray
    solve: linsolve.SolveInfo


def _check_seeds(seeds, shape, num_labels, checked):
    V.check_rank("seeds", seeds, 2, "(H, W)")
    V.check_integer("seeds", seeds)
    V.check_shape("seeds", seeds, shape, "(H, W) matching boundary")
    if V.is_concrete(seeds):
        s = np.asarray(seeds)
        if s.size and (s.min() < -1 or s.max() >= num_labels):
            bad = s[(s < -1) | (s >= num_labels)]
            raise ValueError(
                f"seeds: expected values in -1 (unlabelled) .. {num_labels - 1} (num_labels = {num_labels}), "
                f"got {bad.size} out-of-range values, e.g. {int(bad.flat[0])}")
    elif checked:
        V.value_check(jnp.all((seeds >= -1) & (seeds < num_labels)),
                      "seeds: expected values in -1 .. num_labels - 1 = {}, got values from {} to {}",
                      jnp.asarray(num_labels - 1), jnp.min(seeds), jnp.max(seeds))


def _check_boundary(boundary, checked):
    V.check_rank("boundary", boundary, 2, "(H, W)")
    V.check_floating("boundary", boundary)
    if V.is_concrete(boundary):
        b = np.asarray(boundary)
        if not np.all(np.isfinite(b)) or np.any(b < 0):
            raise ValueError(f"boundary: expected finite values >= 0, got min {np.nanmin(b) if b.size else 0} "
                             f"and {int(np.sum(~np.isfinite(b)))} non-finite values")
    elif checked:
        V.value_check(jnp.all(jnp.isfinite(boundary) & (boundary >= 0)),
                      "boundary: expected finite values >= 0, got min {}", jnp.min(boundary))




def _refined_cg(abs_matvec, *, tol, inner_tol, max_iters, max_refinements):
    """A ``solve(matvec, b) -> (x, (SolveInfo, small))`` with componentwise accuracy.

    CG (to ``inner_tol``) on ``A dx = b - A x``, repeated until
    ``max_x |r[x, l]| / sum_l' (|A||x| + |b|)[x, l'] <= tol`` per channel ``l`` (relative to
    the pixel's total, which is what P = u / sum_l u needs), where the maximum skips pixels
    whose total is below ``tiny / eps`` (returned as the (H, W) mask ``small``). Used through :func:`rwseg.linsolve.implicit_solve`, so its
    loops are never differentiated; the adjoint solve runs the same refinement.
    """

    def solve(matvec, b):
        dt = b.dtype
        fi = jnp.finfo(dt)
        floor = jnp.asarray(fi.tiny / fi.eps, dt)

        def measure(x):
            r = b - matvec(x)
            scale = jnp.sum(abs_matvec(x) + jnp.abs(b), axis=-1, keepdims=True)  # per pixel
            small = scale[..., 0] < floor
            ratio = jnp.where(small[..., None], 0, jnp.abs(r) / jnp.where(small[..., None], 1, scale))
            return r, jnp.max(ratio, axis=(0, 1)), small

        def cond(state):
            _, _, omega, _, k, _ = state
            return (k < max_refinements) & jnp.any(omega > tol)

        def body(state):
            x, r, _, _, k, its = state
            # normalise per channel: inner products of a tiny r would underflow
            sigma = jnp.max(jnp.abs(r), axis=(0, 1))
            sigma = jnp.where(sigma > 0, sigma, 1)
            dx, info = linsolve.cg(matvec, r / sigma, tol=inner_tol, max_iters=max_iters)
            x = x + dx * sigma
            r, omega, small = measure(x)
            return x, r, omega, small, k + 1, its + info.iterations

        x0 = jnp.zeros_like(b)
        r0, omega0, small0 = measure(x0)
        x, _, omega, small, _, its = jax.lax.while_loop(
            cond, body, (x0, r0, omega0, small0, jnp.asarray(0, jnp.int32), jnp.asarray(0, jnp.int32)))
        # A NaN/inf right-hand side or operator makes omega non-finite (NaN > tol is False, so
        # the loop stops): return NaN for that label, never the zero start or a stale iterate.
        # (``small`` is then meaningless too: clear it so that no pixel falls back to the
        # path-cost approximation, which would look like a valid P.)
        finite = jnp.isfinite(omega)
        x = jnp.where(finite, x, jnp.asarray(jnp.nan, dt))
        small = small & jnp.all(finite)
        return x, (linsolve.SolveInfo(residual=omega, iterations=its, converged=omega <= tol), small)

    return solve


def step_cost(boundary) -> jnp.ndarray:
    """``m(B) = arccosh(2 e^B - 1)``, elementwise, computed without overflow.

    The decay rate per pixel of the RAWKS walk on a uniform-B lattice (the mass of
    ``4 e^B - 2 cosh k_y - 2 cosh k_x`` along an axis): 0 at B = 0, ``B + log 4 - O(e^-B)``
    for large B. Written as ``B + log(2 - e^-B + 2 sqrt(1 - e^-B))``. Not meant for gradients.

    Args:
        boundary: float array of boundary scores B >= 0, any shape.

    Returns:
        ``m(B)``, same shape and dtype.
    """
    q = -jnp.expm1(-boundary)  # 1 - e^-B, accurate near 0
    return boundary + jnp.log1p(q + 2 * jnp.sqrt(q))


def path_costs(boundary, sources, blocked=None) -> jnp.ndarray:
    """Cheapest 4-connected path cost to a source pixel, per channel: ``phi``.

    ``phi = 0`` at sources, ``inf`` at blocked non-sources and where no source is
    reachable, and ``phi(x) = m(B(x)) + min_{x' ~ x} phi(x')`` elsewhere, ``m`` =
    :func:`step_cost` (the walk pays at every pixel it leaves, paper eq. 5). Min-plus
    Bellman-Ford in a ``lax.while_loop`` until nothing changes (at most H*W sweeps; about
    the longest cheapest path in hops in practice). No gradient.

    Args:
        boundary: (H, W) float boundary scores B >= 0.
        sources: (H, W, L) bool, e.g. the seeds of each label.
        blocked: optional (H, W) bool, pixels no path may enter (e.g. all labelled pixels:
            the walk stops at the first one).

    Returns:
        phi: (H, W, L) in boundary's dtype.
    """
    V.check_rank("sources", sources, 3, "(H, W, L)")
    cost = step_cost(jax.lax.stop_gradient(jnp.asarray(boundary)))[:, :, None]
    inf = jnp.asarray(jnp.inf, cost.dtype)
    fixed = sources if blocked is None else sources | blocked[:, :, None]
    phi0 = jnp.where(sources, 0, inf).astype(cost.dtype)
    h, w, _ = phi0.shape
    pad = ((1, 1), (1, 1), (0, 0))

    def sweep(phi):
        p = jnp.pad(phi, pad, constant_values=inf)
        nb = jnp.minimum(jnp.minimum(p[:-2, 1:-1], p[2:, 1:-1]), jnp.minimum(p[1:-1, :-2], p[1:-1, 2:]))
        return jnp.where(fixed, phi0, jnp.minimum(phi, cost + nb))

    def body(state):
        phi, _, k = state
        new = sweep(phi)
        return new, jnp.any(new != phi), k + 1

    phi, _, _ = jax.lax.while_loop(lambda s: s[1] & (s[2] < h * w), body,
                                   (phi0, jnp.asarray(True), jnp.asarray(0, jnp.int32)))
    return phi


def hitting_probabilities(
    boundary,
    seeds,
    num_labels: int,
    *,
    tol: float = 1e-5,
    inner_tol: float = 1e-4,
    max_iters: int = 2000,
    max_refinements: int = 30,
    checked: bool = False,
    return_info: bool = False,
):
    """Random-walk hitting probabilities from sparse labels (paper eq. 5-8).

    ``P = Z / sum_l Z`` with Z the solution of eq. 7 (4-connected, Z = 0 outside the
    image), one-hot at labelled pixels, uniform where no label is reachable (no seeds).
    Solved in the symmetric scaling of the module docstring by CG with iterative
    refinement until the componentwise relative residual is at most ``tol`` at every
    pixel; differentiable in ``boundary`` by one adjoint solve of the same symmetric
    system (eq. 9-10). Where ``u`` is below float resolution (underflow), P is the
    path-cost approximation (module docstring; no gradient there).

    Value checks: seeds out of range and negative / non-finite boundary raise
    ``ValueError`` eagerly when the inputs are concrete. Under ``jit``/``vmap`` they cannot
    raise; a seed out of range or a negative or non-finite boundary anywhere then gives an
    all-NaN P with ``info.solve.converged`` False for every label (never a plausible P),
    at the cost of one reduction over the inputs (the solve stops at once). ``checked=True`` adds ``checkify`` checks for traced inputs; the
    caller must then wrap the (jitted) function in ``jax.experimental.checkify.checkify``
    and call ``err.throw()``.

    Args:
        boundary: (H, W) float boundary scores B >= 0 (finite).
        seeds: (H, W) int, -1 = unlabelled, 0..num_labels-1 = labelled.
        num_labels: number of labels L (int > 0).
        tol: componentwise relative residual to reach at every pixel.
        inner_tol: relative tolerance of each inner CG solve.
        max_iters: iteration cap of each inner CG solve.
        max_refinements: cap on the refinement rounds.
        checked: add ``checkify`` value checks for traced inputs.
        return_info: also return :class:`RawksInfo`.

    Returns:
        P: (H, W, num_labels) in boundary's dtype; with ``return_info=True`` the pair
            ``(P, info)``, ``info`` a :class:`RawksInfo`.
    """
    num_labels = V.check_nonnegative_int("num_labels", num_labels, positive=True)
    _check_boundary(boundary, checked)
    boundary = jnp.asarray(boundary)
    _check_seeds(seeds, boundary.shape, num_labels, checked)
    seeds = jnp.asarray(seeds)
    dtype = boundary.dtype
    h, w = boundary.shape
    # Unchecked bad values (possible only for traced inputs; concrete ones raised above): a
    # negative or non-finite boundary, or a seed outside -1 .. num_labels - 1, poisons the
    # whole solve, so that P is NaN and ``converged`` False (never a plausible P: a negative
    # B makes the system indefinite, and an out-of-range seed would act as an absorbing
    # pixel of no label). A NaN boundary makes the solve stop at once (module docstring).
    bad = ~(jnp.all(jnp.isfinite(boundary) & (boundary >= 0)) & jnp.all((seeds >= -1) & (seeds < num_labels)))
    boundary = jnp.where(bad, jnp.asarray(jnp.nan, dtype), boundary)

    labelled = seeds >= 0
    unl = ~labelled
    onehot = jax.nn.one_hot(seeds, num_labels, dtype=dtype)  # zeros for -1 (and out of range)
    g = jnp.exp(-boundary / 2)[:, :, None]  # e^{-B/2} in (0, 1]
    valid = stencil.valid_mask(h, w, _FOUR) & unl[:, :, None]
    nbr_unl = stencil.gather(unl[:, :, None], _FOUR)[..., 0]
    coupling = jnp.where(valid & nbr_unl, g * stencil.gather(g, _FOUR)[..., 0] / 4, 0)
    source = jnp.where(valid & ~nbr_unl, g / 2, 0)
    rhs = stencil.apply(source, onehot, _FOUR) + onehot

    def matvec(u):  # symmetric: coupling[x, k] equals coupling[x + o_k, reverse of k]
        return u - stencil.apply(coupling, u, _FOUR)

    def abs_matvec(u):  # |A| |u| for the componentwise residual test
        return jnp.abs(u) + stencil.apply(coupling, jnp.abs(u), _FOUR)

    solve = _refined_cg(abs_matvec, tol=tol, inner_tol=inner_tol, max_iters=max_iters,
                        max_refinements=max_refinements)
    u, (info, small) = linsolve.implicit_solve(matvec, rhs, solve, symmetric=True)
    u = jnp.maximum(u, 0)  # round-off can leave tiny negative values
    total = jnp.sum(u, axis=-1, keepdims=True)
    reachable = jnp.broadcast_to(jnp.any(labelled), (h, w))
    approximate = reachable & (small | (total[..., 0] <= 0))

    def fallback():
        phi = path_costs(boundary, onehot > 0, labelled)
        some = jnp.any(jnp.isfinite(phi), axis=-1, keepdims=True)  # False only for invalid seeds
        logits = jnp.where(jnp.isfinite(phi), -phi, -jnp.inf)
        return jax.nn.softmax(jnp.where(some, logits, 0), axis=-1).astype(dtype)

    p_path = jax.lax.cond(jnp.any(approximate), fallback, lambda: jnp.zeros_like(u))
    # P = u / total with a gradient that stays finite for every total above the floor.
    # A plain ``u / total`` has the VJP ``ct / total - sum_l(ct u) * total**-2``, and
    # ``total**-2`` overflows float32 for total < ~5e-20 (a pixel a few B = 10 walls away
    # from every seed, well above the underflow floor ~1e-31): inf / NaN in the adjoint
    # right-hand side, which the adjoint solve then spreads over the whole gradient. So
    # divide first by the constant total (no gradient; it cancels in P, so P and its
    # derivative are unchanged), then normalise by the O(1) sum: the only large factor
    # left in the backward pass is ``1 / total``, applied once.
    # (The denominators are also safe where the division is not selected: approximate.)
    den = jax.lax.stop_gradient(jnp.where(approximate[..., None] | (total <= 0), 1, total))
    v = u / den
    vsum = jnp.sum(v, axis=-1, keepdims=True)  # 1 up to rounding where not approximate
    p = jnp.where(approximate[..., None], jax.lax.stop_gradient(p_path),
                  v / jnp.where(approximate[..., None] | (vsum <= 0), 1, vsum))
    p = jnp.where(reachable[..., None], p, jnp.asarray(1 / num_labels, dtype))
    p = jnp.where(bad, jnp.asarray(jnp.nan, dtype), p)  # also where no valid seed made P uniform
    info = info._replace(converged=info.converged & ~bad)
    return (p, RawksInfo(reachable=reachable, approximate=approximate, solve=info)) if return_info else p


def _entropy(p):
    tiny = jnp.finfo(p.dtype).tiny
    return -jnp.sum(p * jnp.log(jnp.maximum(p, tiny)), axis=-1)


def uncertainty_weights(P, *, temperature, reachable=None) -> jnp.ndarray:
    """Uncertainty weights ``w(x) = exp(-temperature H(P_x))`` (paper, after eq. 11).

    Differentiable in P (``0 log 0 = 0`` with a finite gradient). The paper calls the
    temperature alpha; rwseg keeps ``alpha`` for the RWN restart probability only.

    Args:
        P: (H, W, L) float label distributions.
        temperature: scalar multiplying the entropy ``H(P_x)``.
        reachable: optional (H, W) bool from :class:`RawksInfo`; the weight is 0 where it is
            False (no label reachable).

    Returns:
        (H, W) in P's dtype.
    """
    V.check_rank("P", P, 3, "(H, W, L)")
    V.check_floating("P", P)
    w = jnp.exp(-jnp.asarray(temperature, P.dtype) * _entropy(P))
    if reachable is not None:
        V.check_shape("reachable", reachable, P.shape[:2], "(H, W) matching P")
        w = jnp.where(reachable, w, 0)
    return w


def rawks_loss(P, logits, *, temperature, reachable=None, weight_gradient: bool = True,
               targets: str = "soft") -> jnp.ndarray:
    """Uncertainty-weighted loss, paper eq. 11, averaged over pixels.

    ``mean_x [ w(x) KL(P_x || Q_x) + H(P_x) ]`` with ``Q = softmax(logits)`` and
    ``w = uncertainty_weights(P, temperature=temperature, reachable=reachable)``.

    Gradient through w: by default (``weight_gradient=True``) w is a function of P and
    carries gradient into P (hence into the boundary network), which is what makes the
    paper's remark meaningful ("the KL component can be avoided by increasing the
    prediction entropy; the explicit entropy term prevents trivial solutions").

    Args:
        P: (H, W, L) float label distributions (from :func:`hitting_probabilities`).
        logits: (H, W, L) float segmentation scores.
        temperature: entropy temperature of :func:`uncertainty_weights`.
        reachable: optional (H, W) bool, weight 0 where False.
        weight_gradient: ``False`` treats w as a constant (``stop_gradient``).
        targets: ``"soft"``: eq. 11 as above. ``"hard"``: a diagnostic, not the paper's loss:
            ``mean_x [ [w(x) >= 1/2] CE(argmax P_x, Q_x) ]``, the cross-entropy of Q against
            P's label at the pixels where P does not abstain (the rule of the abstention rate
            of :func:`rwseg.train.evaluate.evaluate_propagation`), 0 elsewhere. P and w are
            constants there (no gradient reaches P): for training Q on a fixed P only.

    Returns:
        A scalar in ``result_type(P, logits)``.
    """
    if targets not in ("soft", "hard"):
        raise ValueError(f"targets: expected 'soft' (eq. 11) or 'hard' (cross-entropy on argmax P), got {targets!r}")
    V.check_rank("P", P, 3, "(H, W, L)")
    V.check_rank("logits", logits, 3, "(H, W, L)")
    V.check_floating("P", P)
    V.check_floating("logits", logits)
    V.check_shape("logits", logits, P.shape, "(H, W, L) matching P")
    dtype = jnp.result_type(P, logits)
    P, logits = jnp.asarray(P, dtype), jnp.asarray(logits, dtype)
    if targets == "hard":
        P = jax.lax.stop_gradient(P)
    w = uncertainty_weights(P, temperature=temperature, reachable=reachable)
    if not weight_gradient:
        w = jax.lax.stop_gradient(w)
    log_q = jax.nn.log_softmax(logits, axis=-1)
    if targets == "hard":
        ce = -jnp.take_along_axis(log_q, jnp.argmax(P, axis=-1)[..., None], axis=-1)[..., 0]
        # a NaN in P makes w NaN: keep it (not "abstain" on it, a plausible number)
        return jnp.mean(jnp.where(jnp.isnan(w), w, jnp.where(w >= 0.5, ce, 0)))
    tiny = jnp.finfo(dtype).tiny
    kl = jnp.sum(P * (jnp.log(jnp.maximum(P, tiny)) - log_q), axis=-1)
    return jnp.mean(w * kl + _entropy(P))
