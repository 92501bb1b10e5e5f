"""RWN — convolutional random walk networks (Bertasius et al., CVPR 2017; seed 000).

Math: ``../shared/docs/methods.md`` §1. Pixel affinities on a stencil (``rwseg.stencil``)
are learned from per-channel feature distances (paper §3.2, eq. 1), normalised to a
transition matrix ``A = D^-1 W`` and used to diffuse segmentation scores ``f``:

- training: one step ``y = A f`` (paper eq. 2; ``random_walk(..., alpha=1.0, steps=1)``);
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

__all__ = ["feature_distances", "affinity", "transition", "random_walk", "affinity_loss"]


def _check_map(name, x, layout="(H, W, C)"):
    V.check_rank(name, x, 3, layout)
    V.check_floating(name, x)


def feature_distances(features, offsets) -> jnp.ndarray:
    """Per-channel L1 distances to every stencil neighbour (paper §3.2).

    features: (H, W, C) -> (H, W, K, C) with ``out[i, k, c] = |F[i, c] - F[i + o_k, c]|``,
    zero where ``i + o_k`` is outside the image. The paper uses the RGB image and two
    low-level feature maps (C = 131) and a disk of radius R (``stencil.disk_offsets``).
    """
    offsets = stencil.as_offsets(offsets)
    _check_map("features", features)
    h, w, _ = features.shape
    d = jnp.abs(features[:, :, None, :] - stencil.gather(features, offsets))
    return jnp.where(stencil.valid_mask(h, w, offsets)[..., None], d, 0)


def affinity(distances, theta, offsets=None) -> jnp.ndarray:
    """The affinity branch: a 1x1 convolution over the distances followed by ``exp``.

    distances: (H, W, K, C) from :func:`feature_distances`; theta: (C,) the paper's
    "131 extra parameters" (learned; negative values make distant features dissimilar).
    Returns (H, W, K): ``w[i, k] = exp(sum_c theta_c d[i, k, c])`` (paper §3.2). With
    ``offsets`` given, entries whose neighbour is outside the image are set to zero;
    without, they are left as computed (every rwseg operator ignores them anyway).
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

    weights: (H, W, K) nonnegative; x: (H, W, C) -> (H, W, C).
    ``D_ii = sum_k weights[i, k]`` over valid entries; a row of zero degree gives 0.
    """
    inv_d, _ = _inverse_degree(weights, offsets)
    return inv_d * stencil.apply(weights, x, offsets)


def _check_symmetric(weights, offsets):
    """Eager check that the stencil weights describe a symmetric matrix W."""
    index = {o: k for k, o in enumerate(offsets)}
    missing = [o for o in offsets if (-o[0], -o[1]) not in index]
    if missing:
        raise ValueError(f"symmetric: the stencil must contain -o for every offset o; missing the "
                         f"negation of {missing[:3]}")
    h, w, _ = weights.shape
    valid = stencil.valid_mask(h, w, offsets)
    wv = np.where(valid, np.asarray(weights), 0)
    worst = 0.0
    for k, (dy, dx) in enumerate(offsets):
        back = np.asarray(stencil.shift(jnp.asarray(wv[..., index[(-dy, -dx)]]), (dy, dx)))
        worst = max(worst, float(np.max(np.abs(np.where(valid[..., k], wv[..., k] - back, 0)))))
    scale = float(np.max(np.abs(wv))) if wv.size else 0.0
    if worst > 1e-5 * max(scale, 1e-30):
        raise ValueError(
            f"weights: symmetric=True promises W = W^T, but weights[i, k] differs from the weight "
            f"of the reverse pair by up to {worst:.3g} (max weight {scale:.3g}); pass symmetric=False")


def random_walk(
    weights,
    f,
    offsets,
    *,
    alpha,
    steps: Optional[int] = None,
    symmetric: bool = False,
    tol: float = 1e-6,
    max_iters: int = 1000,
    return_info: bool = False,
):
    """The random-walk layer / converged random walk of RWN (paper eq. 2-3, §3.4).

    weights: (H, W, K) nonnegative affinities on ``offsets`` (e.g. from :func:`affinity`);
    f: (H, W, C) segmentation scores. ``A = D^-1 W``, ``D_ii = sum_k weights[i, k]`` over
    valid entries (a row of zero degree stays zero, so such a pixel keeps
    ``(1 - alpha) f_i`` in the limit).

    The walk: ``y_0 = f``, ``y_{t+1} = alpha A y_t + (1 - alpha) f``.

    - ``steps=n`` (Python int): exactly n steps with ``lax.scan`` (differentiated through the
      scan). ``steps=1, alpha=1.0`` is the paper's training layer ``y = A f`` (eq. 2).
    - ``steps=None``: the limit ``(1 - alpha)(I - alpha A)^-1 f`` (eq. 3), requiring
      ``0 <= alpha < 1`` (checked eagerly when ``alpha`` is concrete), by a linear solve with
      implicit gradients in ``weights`` and ``f`` (one adjoint solve). With
      ``symmetric=True`` (a promise that W = W^T, verified eagerly on concrete weights) it
      solves the SPD system ``(D - alpha W) y = (1 - alpha) D f`` by Jacobi-preconditioned CG;
      otherwise ``(I - alpha A) y = (1 - alpha) f`` by BiCGStab.

    tol, max_iters: solver settings (per channel, relative residual). return_info: also
    return the :class:`rwseg.linsolve.SolveInfo` (``None`` for ``steps=n``), so that a
    non-converged solve can be detected.

    Returns y (H, W, C) in the common dtype of ``weights`` and ``f`` (or ``(y, info)``).
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
    if V.is_concrete(alpha) and np.ndim(alpha) != 0:
        raise ValueError(f"alpha: expected a scalar, got shape {np.shape(alpha)}")
    alpha_c = jnp.asarray(alpha, dtype)

    if steps is not None:
        steps = V.check_nonnegative_int("steps", steps)

        def step(y, _):
            return alpha_c * transition(weights, y, offsets) + (1 - alpha_c) * f, None

        y, _ = jax.lax.scan(step, f, None, length=steps)
        return (y, None) if return_info else y

    if V.is_concrete(alpha) and not 0 <= float(alpha) < 1:
        raise ValueError(f"alpha: expected 0 <= alpha < 1 for the converged walk (steps=None), got {alpha}")
    if V.is_concrete(weights) and V.is_concrete(f):
        if np.any(np.asarray(weights) < 0):
            raise ValueError("weights: expected nonnegative affinities, got negative entries")
        if symmetric:
            _check_symmetric(weights, offsets)

    inv_d, d = _inverse_degree(weights, offsets)
    if symmetric:
        d1 = jnp.where(d > 0, d, 1)  # zero-degree rows: y_i = (1 - alpha) f_i

        def matvec(y):
            return d1 * y - alpha_c * stencil.apply(weights, y, offsets)

        y, info = linsolve.cg(matvec, (1 - alpha_c) * d1 * f, tol=tol, max_iters=max_iters,
                              preconditioner=linsolve.jacobi(d1))
    else:

        def matvec(y):
            return y - alpha_c * inv_d * stencil.apply(weights, y, offsets)

        y, info = linsolve.bicgstab(matvec, (1 - alpha_c) * f, tol=tol, max_iters=max_iters)
    return (y, info) if return_info else y


def affinity_loss(weights, labels, offsets, ignore_index: int = 255) -> jnp.ndarray:
    """Squared error of affinities against ground-truth affinities (paper §3.3).

    weights: (H, W, K) predicted affinities; labels: (H, W) int. Targets are
    ``stencil.label_affinity``: 1 where pixel i and i + o_k share a label, else 0. Pairs with
    an ignored/negative label or a neighbour outside the image are excluded. Returns the
    **mean** over valid pairs (0 when there is none), a scalar in the dtype of ``weights``.
    """
    offsets = stencil.as_offsets(offsets)
    V.check_rank("weights", weights, 3, "(H, W, K)")
    V.check_floating("weights", weights)
    V.check_rank("labels", labels, 2, "(H, W)")
    h, w = labels.shape
    V.check_shape("weights", weights, (h, w, len(offsets)),
                  f"(H, W, K) matching labels and K = len(offsets) = {len(offsets)}")
    targets, valid = stencil.label_affinity(labels, offsets, ignore_index)
    err = jnp.where(valid, (weights - targets.astype(weights.dtype)) ** 2, 0)
    n = jnp.sum(valid)
    return jnp.sum(err) / jnp.maximum(n, 1).astype(weights.dtype)
