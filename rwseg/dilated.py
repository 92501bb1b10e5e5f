"""Dilated affinity (Wu et al., dilated affinity for semantic segmentation; ``docs/methods.md`` §5).

"The paper" below is that work.

For a set of rates R, each pixel is linked to 8 neighbours per rate: channel ``c`` of an
affinity head is offset ``c`` of :func:`rwseg.stencil.dilated_offsets` (8·|R| channels,
rate-major, each rate's 8 offsets row-major). Ground-truth targets and their validity
come from :func:`rwseg.stencil.label_affinity`.

- :func:`neighbor_counts` — the neighbour category n0..n8 of each pixel and rate (§3.2);
- :func:`category_frequencies` — its (|R|, 9) histogram over a dataset (Fig. 3), streamed;
- :func:`prior_bias` — the affinity head's bias initialisation (§4.1);
- :func:`affinity_loss` — focal loss (eq. 4) with square-root inverse-frequency weights (eq. 5);
- :func:`propagate` — affinity propagation refinement (eq. 6, 7).

Validity (a choice, documented once here): a (pixel, rate) is *valid* when the pixel is
not ignored (label ``>= 0`` and ``!= ignore_index``) and all 8 of its neighbours at that
rate are inside the image and not ignored. Only then is its category ``n`` (the number of
neighbours sharing its label) well defined, so only valid (pixel, rate) entries enter the
frequency table and the loss. Near the image border (closer than the rate) no pixel is
valid at that rate.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rwseg import _validate as V
from rwseg import stencil as S
from rwseg._numerics import masked_mean, safe_divide
from rwseg.constants import IGNORE_INDEX

__all__ = ["neighbor_counts", "category_frequencies", "prior_bias", "affinity_loss", "propagate"]

NUM_CATEGORIES = 9  # n0 .. n8


def _offsets(rates) -> tuple[S.Offsets, int]:
    offsets = S.dilated_offsets(rates)
    return offsets, len(offsets) // 8


def _check_labels(name, labels):
    V.check_rank(name, labels, 2, "(H, W)")
    V.check_integer(name, labels)


def _counts_from_affinity(targets, valid, num_rates):
    h, w = targets.shape[:2]
    counts = targets.reshape(h, w, num_rates, 8).sum(axis=-1).astype(jnp.int32)
    return counts, valid.reshape(h, w, num_rates, 8).all(axis=-1)


def neighbor_counts(labels, rates, *, ignore_index: int = IGNORE_INDEX):
    """Neighbour category of every pixel and rate (paper §3.2, eq. 5's ``n_sum(y_a)``).

    ``counts[i, r]`` in 0..8 is the number of the 8 neighbours at rate r that share pixel
    i's label (counted among the neighbours that are inside and not ignored);
    ``valid[i, r]`` says whether the category is defined (pixel not ignored and all 8
    neighbours inside and not ignored; module docstring). jit/vmap-able (``rates`` static).

    Args:
        labels: (H, W) int labels.
        rates: dilation rates, e.g. ``(8, (12, 24), 16)`` (:func:`rwseg.stencil.dilated_offsets`).
        ignore_index: label value of ignored pixels.

    Returns:
        ``(counts, valid)``, both (H, W, |R|): int32 counts and bool validity.
    """
    _check_labels("labels", labels)
    offsets, num_rates = _offsets(rates)
    targets, valid = S.label_affinity(labels, offsets, ignore_index=ignore_index)
    return _counts_from_affinity(targets, valid, num_rates)


def _histogram(labels, offsets, ignore_index):
    targets, valid = S.label_affinity(labels, offsets, ignore_index=ignore_index)
    counts, ok = _counts_from_affinity(targets, valid, len(offsets) // 8)
    onehot = jax.nn.one_hot(counts, NUM_CATEGORIES, dtype=jnp.int32) * ok[..., None]
    return onehot.sum(axis=(0, 1))


_histogram_jit = jax.jit(_histogram, static_argnums=(1, 2))


def category_frequencies(label_maps: Iterable, rates, *, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Frequency table of the neighbour categories over a dataset (paper Fig. 3).

    ``table[r, n]`` = number of valid (pixel, rate r) entries of category n. Counts (not
    proportions): tables of dataset shards add up; :func:`prior_bias` and
    :func:`affinity_loss` normalise each row themselves.

    Args:
        label_maps: an iterable of (H, W) int label maps (sizes may differ; consumed once,
            so a generator streams a dataset).
        rates: dilation rates as in :func:`neighbor_counts`.
        ignore_index: label value of ignored pixels.

    Returns:
        ``(|R|, 9)`` int64 numpy array.
    """
    offsets, num_rates = _offsets(rates)
    table = np.zeros((num_rates, NUM_CATEGORIES), np.int64)
    for idx, labels in enumerate(label_maps):
        _check_labels(f"label_maps[{idx}]", labels)
        table += np.asarray(_histogram_jit(jnp.asarray(labels), offsets, ignore_index), np.int64)
    return table


def _check_values(name, x, what, *, nonnegative: bool, checked: bool = False):
    """Value checks: eager ``ValueError`` on concrete input; checkify checks with ``checked``."""
    if V.is_concrete(x):
        a = np.asarray(x, np.float64)
        n_bad = int(np.sum(~np.isfinite(a)))
        n_neg = int(np.sum(a < 0)) if nonnegative else 0
        if n_bad or n_neg:
            raise ValueError(f"{name}: expected finite {what}, got {n_bad} NaN/inf and "
                             f"{n_neg} negative entries in an array of shape {a.shape}")
    elif checked:
        x = jnp.asarray(x)
        ok = jnp.all(jnp.isfinite(x)) & (jnp.all(x >= 0) if nonnegative else True)
        V.value_check(ok, f"{name}: expected finite {what}, got min {{}} max {{}}", jnp.min(x), jnp.max(x))


def _check_table(frequencies, num_rates=None, checked=False):
    V.check_rank("frequencies", frequencies, 2, "(|R|, 9)")
    expected = (num_rates, NUM_CATEGORIES)
    layout = "(|R|, 9)" if num_rates is None else f"(|R|, 9) with |R| = len(rates) = {num_rates}"
    V.check_shape("frequencies", frequencies, expected, layout)
    _check_values("frequencies", frequencies, "counts >= 0", nonnegative=True, checked=checked)


def _out_float(x):
    dtype = jnp.result_type(x)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def prior_bias(frequencies, *, eps: float = 1e-6):
    """Bias initialisation of the affinity head, ``b_r = -log((1 - pi_r) / pi_r)`` (paper §4.1).

    ``sigmoid(b_r) = pi_r`` at initialisation (the focal-loss prior of Lin et al., *Focal
    Loss for Dense Object Detection*, which the paper cites; the extracted text's
    ``-log(pi / (1 - pi))`` has the opposite sign and would start at ``1 - pi_r``).
    ``pi_r`` is the fraction of positive pairs at rate r among valid (pixel, rate) entries,
    read off the table: each entry of category n has n positive pairs out of 8, so
    ``pi_r = sum_n n·F[r, n] / (8 sum_n F[r, n])``, clipped to ``[eps, 1 - eps]`` so that a
    rate with only positive (or negative) pairs gives a finite bias. A rate with an empty
    row (no valid entry) raises ``ValueError`` when the table is concrete (NaN under
    ``jit``). The head's 8·|R| biases are ``jnp.repeat(b, 8)``.

    Args:
        frequencies: (|R|, 9) table from :func:`category_frequencies` (counts or
            proportions).
        eps: clipping margin of ``pi_r``.

    Returns:
        (|R|,) bias; float tables keep their dtype, integer tables give float32.
    """
    _check_table(frequencies)
    dtype = _out_float(frequencies)
    f = jnp.asarray(frequencies).astype(dtype)
    total = f.sum(axis=1)
    if V.is_concrete(frequencies):
        empty = np.nonzero(np.asarray(total) <= 0)[0]
        if empty.size:
            raise ValueError(f"frequencies: expected every row (rate) to have a positive total, rows {empty.tolist()} are empty")
    pi = (f * jnp.arange(NUM_CATEGORIES, dtype=dtype)).sum(axis=1) / (8 * total)
    pi = jnp.clip(pi, eps, 1 - eps)
    return -jnp.log((1 - pi) / pi)


def _category_weights(frequencies, dtype):
    """(|R|, 9) table -> (|R|, 9) weights ``sqrt(freq(n8) / freq(n))``; 1 where undefined."""
    f = jnp.asarray(frequencies).astype(dtype)
    f8 = f[:, 8:9]
    defined = (f > 0) & (f8 > 0)
    return jnp.where(defined, jnp.sqrt(safe_divide(f8, f)), 1)


def _focal(logits, targets, gamma):
    """Eq. 4, ``-(1 - p_t)^gamma log p_t`` with ``p_t = sigmoid(s z)``, ``s = +-1``.

    ``optax.sigmoid_focal_loss`` (log-space focal weight since optax 0.2.5, stable in z).
    """
    return optax.sigmoid_focal_loss(logits, (targets > 0).astype(logits.dtype), gamma=gamma)


def affinity_loss(logits, labels, rates, frequencies, *, gamma: float = 2.0, ignore_index: int = IGNORE_INDEX,
                  checked: bool = False):
    """Reweighted focal loss of the dilated affinities (paper eq. 4-5, without beta).

    ::

        loss = sum_{valid (i, r)} w[i, r] sum_{c in rate r} FL(logit[i, c], target[i, c])
               / (8 · #valid (i, r))

    i.e. the weighted focal loss averaged over the valid pairs, with
    ``w[i, r] = sqrt(freq(n8, r) / freq(n, r))`` for the category n of (i, r) (so n8
    weighs 1), ``FL = -(1 - p_t)^gamma log p_t``, ``p = sigmoid(logit)``
    (``optax.sigmoid_focal_loss``). A weight whose ratio is undefined (zero frequency of n
    or n8 in the table) is 1. No valid pair gives 0. Multiply by beta (1.2 in the paper)
    outside. jit/vmap/grad-able.

    Non-finite logits and negative or non-finite frequencies raise ``ValueError`` when
    the inputs are concrete; under ``jit`` pass ``checked=True`` and wrap the call in
    ``jax.experimental.checkify.checkify`` to have them reported.

    Args:
        logits: (H, W, 8·|R|) float, channel c = offset c of ``dilated_offsets(rates)``.
        labels: (H, W) int labels.
        rates: dilation rates as in :func:`neighbor_counts`.
        frequencies: (|R|, 9) table (:func:`category_frequencies`).
        gamma: focusing exponent of the focal loss (eq. 4).
        ignore_index: label value of ignored pixels.
        checked: add ``checkify`` value checks for traced inputs.

    Returns:
        A scalar in the logits' dtype.
    """
    offsets, num_rates = _offsets(rates)
    _check_labels("labels", labels)
    V.check_rank("logits", logits, 3, "(H, W, 8·|R|)")
    V.check_floating("logits", logits)
    h, w = np.shape(labels)
    V.check_shape("logits", logits, (h, w, len(offsets)), f"(H, W, 8·|R|) with (H, W) of labels and |R| = {num_rates}")
    _check_table(frequencies, num_rates, checked)
    _check_values("logits", logits, "logits", nonnegative=False, checked=checked)
    dtype = jnp.result_type(logits)
    targets, valid = S.label_affinity(labels, offsets, ignore_index=ignore_index)
    counts, ok = _counts_from_affinity(targets, valid, num_rates)
    weight_table = _category_weights(frequencies, dtype)
    weights = weight_table[jnp.arange(num_rates), counts]  # (H, W, |R|)
    fl = _focal(logits, targets, gamma).reshape(h, w, num_rates, 8).sum(axis=-1)
    return (masked_mean(weights * fl, ok) / 8).astype(dtype)


def _check_rate_parameter(name, value, checked):
    """``lam`` / ``mu``: a scalar, finite and >= 0 (Python number or 0-d array, maybe traced).

    Concrete values raise ``ValueError`` here; traced ones are checked by checkify with
    ``checked``. Returns a predicate that is False for a bad traced value (the caller
    turns the result into NaN), or ``None`` when the value was checked eagerly.
    """
    if isinstance(value, bool) or not (isinstance(value, (int, float, np.integer, np.floating))
                                       or hasattr(value, "dtype")):
        raise TypeError(f"{name}: expected a number (or a 0-d float array), got {type(value).__name__} {value!r}")
    if np.ndim(value) != 0:
        raise ValueError(f"{name}: expected a scalar, got an array of shape {tuple(np.shape(value))}")
    if V.is_concrete(value):
        v = float(np.asarray(value))
        if not (np.isfinite(v) and v >= 0):
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        return None
    ok = jnp.isfinite(value) & (value >= 0)
    if checked:
        V.value_check(ok, f"{name}: expected a finite number >= 0, got {{}}", value)
    return ok


_ZERO_MASS = ("probs: eq. 6 divides each pixel's q_i = lam·p_i·max(p_i) + sum_c g_c·p_(i+o_c) by its mass "
              "sum_k q_i,k, but {} pixel update(s) had zero mass (the pixel and all its neighbours inside "
              "the image carry no probability, or lam = 0 and no neighbour does), so the result is "
              "undefined there; give every pixel positive mass (e.g. a softmax output)")


def propagate(probs, affinity_logits, rates, *, lam=6.0, mu=7.0, num_steps: int = 10, checked: bool = False):
    """Affinity propagation refinement (paper eq. 6 with eq. 7's steep gate).

    Repeats ``num_steps`` times::

        q_i = lam · p_i · max_k p_{i,k} + sum_c sigmoid(mu · logit_{i,c}) · p_{i + o_c}
        p_i = q_i / sum_k q_{i,k}

    Neighbours outside the image contribute nothing (:func:`rwseg.stencil.apply`). After
    at least one step each pixel sums to 1; ``num_steps=0`` returns ``probs`` unchanged.
    The loop is a ``lax.fori_loop`` with a static count, so it is reverse-differentiable
    (in probs, logits, lam and mu).

    Zero mass. A pixel of ``probs`` may be all zero: its ``q_i`` is then the gated sum of
    its neighbours, and it leaves the first step as their normalised average. The
    normalisation is undefined only where ``q_i`` itself is zero (the pixel and every
    neighbour inside the image carry no probability — e.g. an all-zero map, or
    ``lam = 0`` with no neighbour inside a tiny image): no distribution is more right
    than another there, so the result is not a number. That raises ``ValueError`` when
    the inputs are concrete and is reported by checkify with ``checked=True``; unchecked
    under ``jit`` such a pixel is NaN, and so is every pixel that later steps reach from
    it (their update depends on it) — never a plausible distribution.

    Value checks: negative or non-finite probabilities, non-finite logits and a
    non-finite or negative ``lam`` / ``mu`` raise ``ValueError`` when the inputs are
    concrete; under ``jit`` pass ``checked=True`` and wrap the call in
    ``jax.experimental.checkify.checkify`` to have them reported. Unchecked under
    ``jit``, a negative or non-finite ``lam`` / ``mu`` or probability gives NaN outputs.

    Args:
        probs: (H, W, C) float class probabilities (>= 0).
        affinity_logits: (H, W, 8·|R|) float, channel c = offset c of
            ``dilated_offsets(rates)``.
        rates: dilation rates as in :func:`neighbor_counts`.
        lam: weight of the pixel's own term, a scalar >= 0 (6 in the paper); a Python
            number or a 0-d array (traced ones too, e.g. learned).
        mu: gate steepness, a scalar >= 0 (7 in the paper), same types as ``lam``.
        num_steps: number of propagation steps (Python int >= 0).
        checked: add ``checkify`` value checks for traced inputs.

    Returns:
        (H, W, C) in ``result_type(probs, affinity_logits)``.
    """
    offsets, num_rates = _offsets(rates)
    num_steps = V.check_nonnegative_int("num_steps", num_steps)
    V.check_rank("probs", probs, 3, "(H, W, C)")
    V.check_floating("probs", probs)
    V.check_rank("affinity_logits", affinity_logits, 3, "(H, W, 8·|R|)")
    V.check_floating("affinity_logits", affinity_logits)
    h, w, _ = np.shape(probs)
    V.check_shape("affinity_logits", affinity_logits, (h, w, len(offsets)),
                  f"(H, W, 8·|R|) with (H, W) of probs and |R| = {num_rates}")
    lam_ok = _check_rate_parameter("lam", lam, checked)
    mu_ok = _check_rate_parameter("mu", mu, checked)
    _check_values("probs", probs, "probabilities >= 0", nonnegative=True, checked=checked)
    _check_values("affinity_logits", affinity_logits, "logits", nonnegative=False, checked=checked)
    dtype = jnp.result_type(probs, affinity_logits)
    probs = jnp.asarray(probs, dtype)
    nan = jnp.asarray(jnp.nan, dtype)
    if lam_ok is not None:  # traced: a bad value must not give a plausible result
        lam = jnp.where(lam_ok, lam, nan)
    if mu_ok is not None:
        mu = jnp.where(mu_ok, mu, nan)
    if not V.is_concrete(probs):
        probs = jnp.where(probs >= 0, probs, nan)  # also NaN for -inf; +inf gives NaN below
    gates = jax.nn.sigmoid(mu * jnp.asarray(affinity_logits, dtype)).astype(dtype)

    def step(_, carry):
        p, zero = carry
        q = lam * p * jnp.max(p, axis=-1, keepdims=True) + S.apply(gates, p, offsets)
        mass = jnp.sum(q, axis=-1, keepdims=True)
        # mass == 0 gives 0/0 = NaN: undefined, see the docstring; counted for the checks.
        return (q / mass).astype(dtype), zero + jnp.sum(mass == 0, dtype=jnp.int32)

    out, zero = jax.lax.fori_loop(0, num_steps, step, (probs, jnp.zeros((), jnp.int32)))
    if V.is_concrete(out):
        if int(zero):
            raise ValueError(_ZERO_MASS.format(int(zero)))
        n_bad = int(np.sum(~np.isfinite(np.asarray(out))))
        if n_bad:
            raise ValueError(f"probs: propagation overflowed, {n_bad} non-finite outputs (are probs and lam "
                             f"of order 1? got max probability {float(np.max(np.asarray(probs)))})")
    elif checked:
        V.value_check(zero == 0, _ZERO_MASS, zero)
    return out
