"""RWN — Bertasius, Torresani, Yu & Shi, *Convolutional Random Walk Networks for Semantic Image Segmentation* (CVPR 2017).

Math: ``docs/methods.md`` §1. Pixel affinities on a stencil (``rwseg.stencil``)
are learned from per-channel feature distances (paper §3.2, eq. 1), normalised to a
transition matrix ``A = D^-1 W`` and used to diffuse segmentation scores ``f``:

- training: one step ``y = A f`` (paper eq. 2; ``random_walk(..., alpha=1.0, num_steps=1)``);
- test: the walk run to convergence, ``y = (1 - alpha)(I - alpha A)^-1 f`` (paper §3.4,
  eq. 3, written there without the factor ``1 - alpha``, which does not change the argmax),
  solved matrix-free by :mod:`rwseg.linsolve` and differentiated by one adjoint solve.

All functions take one image, channels last, and batch with ``jax.vmap``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rwseg import _validate as V
from rwseg import linsolve, stencil
from rwseg._numerics import channel_scale, masked_mean
from rwseg.constants import IGNORE_INDEX

__all__ = ["feature_distances", "affinity", "transition", "random_walk", "affinity_loss"]


def _check_map(name, x, layout="(H, W, C)"):
    V.check_rank(name, x, 3, layout)
    V.check_floating(name, x)


def feature_distances(features, offsets) -> jnp.ndarray:
    """Per-channel L1 distances to every stencil neighbour (paper §3.2, the input of eq. 1).

    ``out[i, k, c] = |F[i, c] - F[i + o_k, c]|``, zero where ``i + o_k`` is outside the
    image. The paper uses the RGB image and two low-level feature maps (C = 131) and a
    disk of radius R (:func:`rwseg.stencil.disk_offsets`).

    Args:
        features: (H, W, C) float feature map F.
        offsets: K stencil offsets ``(dy, dx)``.

    Returns:
        (H, W, K, C) distances in the dtype of ``features``.
    """
    offsets = stencil.as_offsets(offsets)
    _check_map("features", features)
    h, w, _ = features.shape
    d = jnp.abs(features[:, :, None, :] - stencil.gather(features, offsets))
    return jnp.where(stencil.valid_mask(h, w, offsets)[..., None], d, 0)


def affinity(distances, theta, offsets=None) -> jnp.ndarray:
    """The affinity branch: a 1x1 convolution over the distances followed by ``exp`` (paper §3.2, eq. 1).

    ``w[i, k] = exp(sum_c theta_c d[i, k, c])``.

    Args:
        distances: (H, W, K, C) float, from :func:`feature_distances`.
        theta: (C,) the paper's "131 extra parameters" (learned; negative values make
            distant features dissimilar).
        offsets: optional K stencil offsets; when given, entries whose neighbour is
            outside the image are set to zero; without, they are left as computed
            (every rwseg operator ignores them anyway).

    Returns:
        (H, W, K) affinities in the dtype of ``distances``.
    """
    V.check_rank("distances", distances, 4, "(H, W, K, C)")
    V.check_floating("distances", distances)
    c = distances.shape[-1]
    V.check_rank("theta", theta, 1, "(C,)")
    V.check_shape("theta", theta, (c,), f"(C,) with C = distances.shape[-1] = {c}")
    w = jnp.exp(jnp.einsum("hwkc,c->hwk", distances, jnp.asarray(theta, distances.dtype)))
    if offsets is not None:
        offsets = stencil.as_offsets(offsets)
        h, wd, k = w.shape
        V.check_shape("distances", distances, (h, wd, len(offsets), c),
                      f"(H, W, K, C) with K = len(offsets) = {len(offsets)}")
        w = jnp.where(stencil.valid_mask(h, wd, offsets), w, 0)
    return w


def _inverse_degree(weights, offsets):
    d = stencil.degree(weights, offsets)[..., None]
    pos = d > 0
    return jnp.where(pos, 1 / jnp.where(pos, d, 1), 0), d


def transition(weights, x, offsets) -> jnp.ndarray:
    """``A x`` with ``A = D^-1 W`` (paper eq. 2), matrix-free.

    ``D_ii = sum_k weights[i, k]`` over valid entries; a row of zero degree gives 0.

    Args:
        weights: (H, W, K) nonnegative affinities W on ``offsets``.
        x: (H, W, C) float.
        offsets: K stencil offsets ``(dy, dx)``.

    Returns:
        (H, W, C) ``A x`` in ``result_type(weights, x)``.
    """
    inv_d, _ = _inverse_degree(weights, offsets)
    return inv_d * stencil.apply(weights, x, offsets)


def _check_symmetric(weights, offsets):
    """Eager check that the stencil weights describe a symmetric matrix W (:func:`rwseg.stencil.asymmetry`)."""
    try:
        defect, scale = (float(v) for v in stencil.asymmetry(weights, offsets))
    except ValueError as e:
        raise ValueError(f"symmetric: {e}") from None
    if defect > 1e-5 * max(scale, 1e-30):
        raise ValueError(
            f"weights: symmetric=True promises W = W^T, but weights[i, k] differs from the weight "
            f"of the reverse pair by up to {defect:.3g} (max weight {scale:.3g}); pass symmetric=False")


def _check_alpha(alpha, dtype, converged, checked):
    """alpha as a ``dtype`` scalar; for the converged walk NaN unless ``0 <= alpha < 1``."""
    if V.is_concrete(alpha) and np.ndim(alpha) != 0:
        raise ValueError(f"alpha: expected a scalar, got shape {np.shape(alpha)}")
    alpha_c = jnp.asarray(alpha, dtype)
    if not converged:
        return alpha_c
    if V.is_concrete(alpha):
        if not 0 <= float(alpha) < 1:
            raise ValueError(f"alpha: expected 0 <= alpha < 1 for the converged walk (num_steps=None), got {alpha}")
        return alpha_c
    ok = (alpha_c >= 0) & (alpha_c < 1)
    if checked:
        V.value_check(ok, "alpha: expected 0 <= alpha < 1 for the converged walk (num_steps=None), got {}", alpha_c)
    # unchecked: a traced alpha out of range (e.g. a saturated sigmoid = 1.0) gives NaN, not zeros
    return jnp.where(ok, alpha_c, jnp.asarray(jnp.nan, dtype))


def _inverse_sqrt_degree(weights, offsets):
    """``D^-1/2`` (H, W, 1), with 1 in place of a zero degree (such a row has no coupling)."""
    d = stencil.degree(weights, offsets)[..., None]
    return jax.lax.rsqrt(jnp.where(d > 0, d, 1))


# The CG state is padded with zero channels to a multiple of this many when C > _LANES:
# XLA's CPU code for the 80-neighbour stencil product vectorises over the channel axis,
# and with C = 21 it ran ~1.5x slower per channel than with C = 24 (measured at 128x128,
# docs/benchmarks/random_walks.md). Zero channels converge at once (zero right-hand side).
_LANES = 8


def _power_of_two_scale(f):
    """``2^e`` per channel with ``2^(e-1) <= max |f| < 2^e`` (1 for a zero or non-finite channel).

    Dividing or multiplying by it is exact (no rounding) wherever the result stays in the
    normal range.
    """
    _, e = jnp.frexp(channel_scale(f))
    return jnp.ldexp(jnp.ones((), f.dtype), e).astype(f.dtype)


def _pad_channels(x):
    c = x.shape[-1]
    extra = (-c) % _LANES if c > _LANES else 0
    return jnp.pad(x, ((0, 0), (0, 0), (0, extra))) if extra else x


def random_walk(
    weights,
    f,
    offsets,
    *,
    alpha,
    num_steps: Optional[int] = None,
    symmetric: bool = False,
    tol: float = 1e-6,
    max_iters: int = 1000,
    return_info: bool = False,
    checked: bool = False,
    remat: bool = False,
):
    """The random-walk layer / converged random walk of RWN (paper eq. 2-3, §3.4).

    ``A = D^-1 W``, ``D_ii = sum_k weights[i, k]`` over valid entries (a row of zero degree
    stays zero, so such a pixel keeps ``(1 - alpha) f_i`` in the limit). The walk:
    ``y_0 = f``, ``y_{t+1} = alpha A y_t + (1 - alpha) f``.

    - ``num_steps=n`` (Python int): exactly n steps with ``lax.scan`` (differentiated
      through the scan). ``num_steps=1, alpha=1.0`` is the paper's training layer
      ``y = A f`` (eq. 2).
    - ``num_steps=None``: the limit ``(1 - alpha)(I - alpha A)^-1 f`` (eq. 3), requiring
      ``0 <= alpha < 1``, by a linear solve with implicit gradients in ``weights`` and
      ``f`` (one adjoint solve). With ``symmetric=True`` (a promise that W = W^T, verified
      eagerly on concrete weights) it solves the SPD system in its symmetric scaling
      ``(I - alpha D^-1/2 W D^-1/2) z = (1 - alpha) D^1/2 f``, ``y = D^-1/2 z``, by CG
      (unit diagonal: the Jacobi preconditioner is built into the operator, whose two
      diagonal scalings fuse into the stencil product, so an iteration is one stencil
      product and no preconditioner pass; the product runs in groups of at most 40
      offsets and the channels are padded with zeros to a multiple of 8 inside the solve,
      both of which XLA's CPU code runs faster — together ~2x over the unscaled
      Jacobi-preconditioned CG at 128x128x21, radius 5, see
      ``docs/benchmarks/random_walks.md``); otherwise ``(I - alpha A) y = (1 - alpha) f``
      by BiCGStab.

    Reachable accuracy in float32 (why CG "stalls"): CG updates its residual by a
    recurrence, which keeps decreasing, while the true residual ``b - A z`` of the float32
    iterate cannot drop below the rounding error of computing ``A z`` itself, about
    ``eps (||b|| + ||A|| ||z||)`` with ``eps = 6e-8``, ``||A|| <= 1 + alpha`` and
    ``||z|| <= ||b|| / (1 - alpha)``; so the true relative residual levels off near
    ``2 eps (1 + alpha) / (1 - alpha)``: measured (64x64, radius 5, 21 classes) 1-2e-7 at
    alpha = 0.5, 0.7-1.5e-6 at alpha = 0.9, 0.8-1.6e-5 at alpha = 0.99 (the "~1e-5 stall"
    of the strongly diffusing walk). ``info.converged`` tests the true residual, so ask for
    ``tol`` a few times above that floor: ``tol = 1e-5`` up to alpha = 0.9, ``1e-4`` for
    alpha = 0.99; below it the loop may stop (recurrence converged) with
    ``converged=False``. float64 inputs reach ``tol = 1e-12``. The symmetric solve scales
    each channel of ``f`` by a power of two near its ``max |f|`` (exact: no rounding changes),
    so scores at the bottom of the normal range (``finfo.tiny``) are walked like any others;
    only outputs that are themselves below it are flushed to zero (XLA on CPU).

    Bad values: a negative weight, ``alpha`` out of [0, 1) (converged walk) or a
    non-symmetric W with ``symmetric=True`` raise ``ValueError`` when the inputs are
    concrete. Under ``jit`` an ``alpha`` outside [0, 1) and NaN/inf weights or scores give
    NaN output (``converged=False``), never zeros; ``checked=True`` adds a ``checkify`` check
    of ``alpha`` (wrap the call in ``jax.experimental.checkify.checkify``).

    Args:
        weights: (H, W, K) float, nonnegative affinities W on ``offsets`` (e.g. from
            :func:`affinity`).
        f: (H, W, C) float segmentation scores.
        offsets: K stencil offsets ``(dy, dx)``.
        alpha: restart weight of the walk, a scalar (``0 <= alpha < 1`` for the converged
            walk; ``1.0`` with ``num_steps=1`` is the training layer). May be traced.
        num_steps: exact number of steps (Python int), or ``None`` for the converged walk.
        symmetric: promise that W = W^T (selects CG on the symmetric scaling).
        tol: relative residual of the solved system at which the converged walk stops,
            per channel (``||b - A z|| / ||b||``, in the scaled variables for
            ``symmetric=True``). Unused with ``num_steps``.
        max_iters: iteration cap of the solver. Unused with ``num_steps``.
        return_info: also return a :class:`rwseg.linsolve.SolveInfo`.
        checked: add ``checkify`` value checks for traced ``alpha``.
        remat: with ``num_steps``, checkpoint each step (``jax.checkpoint``): the backward
            pass keeps the iterate only and recomputes the step's shifted products
            (``config.remat``, :mod:`rwseg.layers.memory`). Same values and gradients.
            Unused without ``num_steps``.

    Returns:
        y: (H, W, C) in ``result_type(weights, f)``; with ``return_info=True`` the pair
            ``(y, info)``, ``info`` a :class:`rwseg.linsolve.SolveInfo`: for the converged walk
            the solver's (residual per channel, iterations, converged per channel, so that a
            non-converged solve can be detected); for ``num_steps=n`` residual 0 (no system is
            solved), ``iterations = n`` and ``converged`` True.
    """
    offsets = stencil.as_offsets(offsets)
    _check_map("f", f)
    V.check_rank("weights", weights, 3, "(H, W, K)")
    V.check_floating("weights", weights)
    h, w, _ = f.shape
    V.check_shape("weights", weights, (h, w, len(offsets)),
                  f"(H, W, K) matching f and K = len(offsets) = {len(offsets)}")
    dtype = jnp.result_type(weights, f)
    weights, f = jnp.asarray(weights, dtype), jnp.asarray(f, dtype)
    if num_steps is not None:
        num_steps = V.check_nonnegative_int("num_steps", num_steps)
    alpha_c = _check_alpha(alpha, dtype, num_steps is None, checked)

    if num_steps is not None:

        def step(y, _):
            return alpha_c * transition(weights, y, offsets) + (1 - alpha_c) * f, None

        if remat:  # save the iterate only; the step's intermediates are recomputed in the backward pass
            step = jax.checkpoint(step)
        y, _ = jax.lax.scan(step, f, None, length=num_steps)
        if not return_info:
            return y
        c = f.shape[-1]
        return y, linsolve.SolveInfo(residual=jnp.zeros((c,), dtype),
                                     iterations=jnp.asarray(num_steps, jnp.int32),
                                     converged=jnp.ones((c,), bool))

    if V.is_concrete(weights) and V.is_concrete(f):
        w_np = np.where(stencil.valid_mask(h, w, offsets), np.asarray(weights), 0)  # outside: ignored
        if not np.all(np.isfinite(w_np)):
            raise ValueError(f"weights: expected finite affinities, got {int(np.sum(~np.isfinite(w_np)))} "
                             "NaN/inf entries (on neighbours inside the image)")
        if np.any(w_np < 0):
            raise ValueError("weights: expected nonnegative affinities, got negative entries")
        if not np.all(np.isfinite(np.asarray(f))):
            raise ValueError(f"f: expected finite scores, got {int(np.sum(~np.isfinite(np.asarray(f))))} NaN/inf entries")
        if symmetric:
            with jax.ensure_compile_time_eval():  # concrete weights closed over inside a jit trace
                _check_symmetric(weights, offsets)

    # The walk is linear in f: solve for f / s and scale back, s = the power of two nearest
    # max |f| per channel, so that (1 - alpha) f (and f * sqrt(d)) does not fall below the normal
    # range (flushed to zero on CPU) for scores near the bottom of it. A power of two scales
    # exactly: every rounding of the solve, hence float32 convergence, is the same as without it
    # (linsolve's own rescaling acts after these products and cannot prevent that).
    s = _power_of_two_scale(jax.lax.stop_gradient(f))
    if symmetric:
        inv_sqrt_d = _inverse_sqrt_degree(weights, offsets)
        alpha_s = alpha_c * inv_sqrt_d
        masked = stencil.mask_weights(weights, offsets)  # once, outside the solver loop

        def matvec(z):  # (I - alpha D^-1/2 W D^-1/2) z: the scalings fuse into the window sums
            return z - alpha_s * stencil.apply_masked(masked, inv_sqrt_d * z, offsets)

        c = f.shape[-1]
        z, info = linsolve.cg(matvec, _pad_channels((1 - alpha_c) * (f / s) / inv_sqrt_d), tol=tol,
                              max_iters=max_iters)
        y = (inv_sqrt_d * z[..., :c]) * s
        info = linsolve.SolveInfo(info.residual[:c], info.iterations, info.converged[:c])
    else:
        inv_d, _ = _inverse_degree(weights, offsets)

        def matvec(y):
            return y - alpha_c * inv_d * stencil.apply(weights, y, offsets)

        y, info = linsolve.bicgstab(matvec, (1 - alpha_c) * (f / s), tol=tol, max_iters=max_iters)
        y = y * s
    return (y, info) if return_info else y


def affinity_loss(weights, labels, offsets, *, ignore_index: int = IGNORE_INDEX) -> jnp.ndarray:
    """Squared error of affinities against ground-truth affinities (paper §3.3).

    Targets are :func:`rwseg.stencil.label_affinity`: 1 where pixel i and i + o_k share a
    label, else 0. Pairs with an ignored/negative label or a neighbour outside the image
    are excluded.

    Args:
        weights: (H, W, K) float predicted affinities on ``offsets``.
        labels: (H, W) int ground-truth labels.
        offsets: K stencil offsets ``(dy, dx)``.
        ignore_index: label value excluded from the loss.

    Returns:
        The **mean** squared error over valid pairs (0 when there is none), a scalar in
            the dtype of ``weights``.
    """
    offsets = stencil.as_offsets(offsets)
    V.check_rank("weights", weights, 3, "(H, W, K)")
    V.check_floating("weights", weights)
    V.check_rank("labels", labels, 2, "(H, W)")
    h, w = labels.shape
    V.check_shape("weights", weights, (h, w, len(offsets)),
                  f"(H, W, K) matching labels and K = len(offsets) = {len(offsets)}")
    targets, valid = stencil.label_affinity(labels, offsets, ignore_index=ignore_index)
    return masked_mean((weights - targets.astype(weights.dtype)) ** 2, valid)
