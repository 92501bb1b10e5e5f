"""Paired bootstrap intervals over images for differences of dataset-level scores.

A dataset score (mean IoU, boundary F, ...) is a function of counts summed over images
(:mod:`rwseg.metrics`: confusion matrices, trimap and boundary counts), not a mean of
per-image scores. To compare method A with a control B evaluated on the same images,
:func:`paired_bootstrap` resamples the *images* with replacement (Efron & Tibshirani,
"An Introduction to the Bootstrap", 1993, ch. 6 and 13: percentile interval), sums
each run's per-image counts with the resampling weights, computes the score of A and of
B on the same resample and takes the difference. With several seeds (runs trained with
different seeds, each of A and of B, evaluated on the same images), the same image
resample is applied to every seed and the difference is averaged over the seeds: the
pairing is by image and by seed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["resample_weights", "paired_bootstrap"]


def resample_weights(num_items: int, num_samples: int, seed: int = 0) -> np.ndarray:
    """``(num_samples, num_items)`` int counts: how often each item is drawn in each resample
    (``num_items`` draws with replacement, uniformly: one multinomial row per resample)."""
    if num_items < 1 or num_samples < 1:
        raise ValueError(f"num_items, num_samples: expected >= 1, got {num_items}, {num_samples}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_items, np.full(num_items, 1.0 / num_items), size=num_samples)


def paired_bootstrap(score: Callable, a, b, *, num_samples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    """Paired bootstrap of ``score(A) - score(B)`` over images (and seeds).

    Args:
      score: maps summed counts with a leading batch axis, a pytree of ``(R, ...)``
        arrays, to ``(R,)`` scores (e.g. a ``jax.vmap`` of a summarize function).
      a: pytree of per-image counts ``(S, N, ...)``: S seeds, N images, the same images in
        the same order in ``a`` and ``b`` and in every seed.
      b: pytree of the same structure as ``a`` (the other method's counts).
      num_samples: bootstrap resamples.
      confidence: of the percentile interval.
      seed: of the resampling.

    Returns ``{"diff", "low", "high", "samples"}``: ``diff`` the seed-mean difference on
    the full set of images, ``[low, high]`` the percentile interval of the resampled
    seed-mean differences (``samples``, shape ``(num_samples,)``).
    """
    import jax

    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence!r}")
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b) or not leaves_a:
        raise ValueError("a, b: expected two non-empty pytrees of the same structure")
    shapes = {np.shape(x)[:2] for x in leaves_a + leaves_b}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"a, b: expected every leaf of shape (seeds, images, ...), "
                         f"got leading shapes {sorted(shapes)}")
    seeds, n = next(iter(shapes))
    w = resample_weights(n, num_samples, seed).astype(np.float64)  # (R, N)

    def scores(tree, weights):  # -> (S, R)
        out = []
        for s in range(seeds):
            summed = jax.tree.map(lambda x: np.tensordot(weights, np.asarray(x[s], np.float64), axes=1), tree)
            out.append(np.asarray(score(summed), np.float64))
        return np.stack(out)

    ones = np.ones((1, n))
    diff = float(np.mean(scores(a, ones) - scores(b, ones)))
    samples = np.mean(scores(a, w) - scores(b, w), axis=0)
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(samples, [tail, 100 - tail])
    return {"diff": diff, "low": float(low), "high": float(high), "samples": samples}
