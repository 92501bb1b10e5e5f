"""Property-based tests (hypothesis) of the operators' public API (issue 9).

Random small shapes (1xN and Nx1 included), random finite inputs within the documented
ranges, and the papers' invariants checked against independent numpy oracles:

- stencil: ``apply`` is the dense stencil matrix, ``apply_transpose`` its adjoint, entries
  pointing outside the image are ignored (even NaN / inf);
- RWN: ``A = D^-1 W`` has unit row sums where the degree is positive, the converged walk
  is the dense solve of eq. 3 and keeps a constant map constant;
- RAWKS: ``P`` sums to 1 and is one-hot at the seeds for empty / one / all / random seeds,
  B in [0, 30];
- SPN: Theorem 1 (a constant map is a fixed point) for gates summing past 1 after
  ``spn.stabilize``, every direction, one- and three-way;
- GCRF: the GMF half-updates never increase the energy (eq. 1), converged GMF is the
  dense solve of ``(I + L_s ⊗ C) y = r``;
- dilated: ``propagate`` rows sum to 1 (eq. 6) and match a numpy loop, or zero mass raises;
- metrics: the confusion matrix counts exactly the valid pixels, and under ``jit`` counts
  the out-of-range ones apart;
- RAWKS under ``jit``: a bad boundary or seed gives NaN, never a plausible P;
- invalid values raise errors naming the argument.

The example budget comes from the hypothesis profile in ``conftest.py`` (``ci`` by
default: few examples, derandomised; ``HYPOTHESIS_PROFILE=dev`` for a longer search).
Shapes are drawn from small sets so that jitted solvers compile only a few times.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rwseg import dilated, gcrf, metrics, rawks, rwn, spn
from rwseg import stencil as S

# Image shapes: 1x1, 1xN, Nx1 and small rectangles (<= 8x8). Drawn from short lists:
# every new shape costs compilations, so examples of a test share them.
SHAPES = ((1, 1), (1, 5), (5, 1), (3, 4))
SOLVER_SHAPES = ((1, 5), (5, 1), (3, 4))  # where a solver is compiled; every pixel has a neighbour


# --------------------------------------------------------------------------- strategies and oracles


def finite(lo, hi, near_tiny=False):
    # no subnormals: XLA on CPU flushes them to zero (a weight of 1e-309 would be a zero weight);
    # values within a few factors of the smallest normal number are mapped to 0 as well unless
    # ``near_tiny`` (products of them with numbers below 1 would be subnormal and flushed; the
    # converged walk's scores, which it scales by sqrt(degree), are drawn with near_tiny=True)
    x = st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=64)
    return x if near_tiny else x.map(lambda x: 0.0 if abs(x) < 1e-300 else x)


def arrays(shape, lo, hi, near_tiny=False):
    return hnp.arrays(np.float64, shape, elements=finite(lo, hi, near_tiny))


def shapes(choices=SHAPES):
    return st.sampled_from(choices)


_any_offset = st.tuples(st.integers(-3, 3), st.integers(-3, 3)).filter(lambda o: o != (0, 0))
STENCILS = st.one_of(
    st.sampled_from([S.four_connected(), S.disk_offsets(2), S.dilated_offsets([1, (1, 2)])]),
    st.lists(_any_offset, min_size=1, max_size=5, unique=True).map(tuple),
)


def inside(h, w, offsets):
    """(H, W, K) bool, by loops: True where pixel + offset is inside the image."""
    out = np.zeros((h, w, len(offsets)), bool)
    for y in range(h):
        for x in range(w):
            for k, (dy, dx) in enumerate(offsets):
                out[y, x, k] = 0 <= y + dy < h and 0 <= x + dx < w
    return out


def dense(weights, offsets):
    """The (H·W, H·W) matrix ``M[i, i + o_k] += weights[i, k]`` (valid entries), by loops."""
    h, w, _ = weights.shape
    m = np.zeros((h * w, h * w))
    for y in range(h):
        for x in range(w):
            for k, (dy, dx) in enumerate(offsets):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    m[y * w + x, (y + dy) * w + x + dx] += weights[y, x, k]
    return m


def symmetrize(raw, offsets):
    """Stencil weights of a symmetric matrix: ``w[i, o] = w[i + o, -o]`` exactly (0 outside)."""
    h, w, _ = raw.shape
    index = {o: k for k, o in enumerate(offsets)}
    out = np.zeros_like(raw)
    for y in range(h):
        for x in range(w):
            for k, (dy, dx) in enumerate(offsets):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    out[y, x, k] = raw[y, x, k] + raw[y + dy, x + dx, index[(-dy, -dx)]]
    return out


def close(a, b, rtol=1e-10, atol=1e-12):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- stencil


@given(shapes(), STENCILS, st.integers(1, 2), st.data())
def test_stencil_apply_is_the_dense_matrix_and_transpose_its_adjoint(shape, offsets, c, data):
    h, w = shape
    weights = data.draw(arrays((h, w, len(offsets)), -10, 10))
    x = data.draw(arrays((h, w, c), -10, 10))
    y = data.draw(arrays((h, w, c), -10, 10))
    m = dense(weights, offsets)
    ax = np.asarray(S.apply(weights, x, offsets))
    aty = np.asarray(S.apply_transpose(weights, y, offsets))
    assert ax.shape == aty.shape == (h, w, c) and np.isfinite(ax).all() and np.isfinite(aty).all()
    scale = 1e-12 * max(1.0, np.abs(weights).sum() * 10)
    close(ax.reshape(-1, c), m @ x.reshape(-1, c), atol=scale)
    close(aty.reshape(-1, c), m.T @ y.reshape(-1, c), atol=scale)
    close(np.vdot(ax, y), np.vdot(x, aty), atol=scale * x.size * 10)
    close(S.degree(weights, offsets).reshape(-1), m.sum(axis=1), atol=scale)


@given(shapes(), STENCILS, st.sampled_from([np.nan, np.inf, -np.inf, 1e300]), st.data())
def test_stencil_ignores_entries_outside_the_image(shape, offsets, junk, data):
    """stencil module docstring: entries pointing outside the image are ignored everywhere
    (issue 9.1: ``apply`` multiplied them by the zero padding, so NaN leaked in)."""
    h, w = shape
    weights = data.draw(arrays((h, w, len(offsets)), -10, 10))
    x = data.draw(arrays((h, w, 2), -10, 10))
    dirty = np.where(inside(h, w, offsets), weights, junk)
    for fn in (S.apply, S.apply_transpose):
        close(fn(dirty, x, offsets), fn(weights, x, offsets), rtol=0, atol=0)
    close(S.degree(dirty, offsets), S.degree(weights, offsets), rtol=0, atol=0)


# --------------------------------------------------------------------------- RWN


@given(shapes(), st.sampled_from([S.four_connected(), S.disk_offsets(2)]), st.data())
def test_rwn_transition_rows_sum_to_one(shape, offsets, data):
    """A = D^-1 W (eq. 2): A 1 = 1 where the degree is positive, 0 where it is zero, and
    A x is a convex combination of neighbours. Weights include exact zeros."""
    h, w = shape
    weights = data.draw(arrays((h, w, len(offsets)), 0, 5))
    x = data.draw(arrays((h, w, 2), -10, 10))
    m = dense(weights, offsets)
    deg = m.sum(axis=1)
    ones = np.asarray(rwn.transition(weights, np.ones((h, w, 1)), offsets)).reshape(-1)
    assert np.isfinite(ones).all()
    close(ones, np.where(deg > 0, 1.0, 0.0))
    a = np.where(deg[:, None] > 0, m / np.where(deg > 0, deg, 1)[:, None], 0)
    close(np.asarray(rwn.transition(weights, x, offsets)).reshape(-1, 2), a @ x.reshape(-1, 2), atol=1e-11)


@functools.partial(jax.jit, static_argnames=("offsets", "symmetric"))
def _converged_walk(weights, f, alpha, offsets, symmetric):
    return rwn.random_walk(weights, f, offsets, alpha=alpha, symmetric=symmetric, tol=1e-12, max_iters=400,
                           return_info=True)


@given(st.sampled_from(SOLVER_SHAPES), st.booleans(), finite(0.0, 0.95), finite(-3, 3), st.data())
def test_rwn_converged_walk_is_the_dense_solve_and_keeps_constants(shape, symmetric, alpha, const, data):
    """Eq. 3: y = (1 - alpha)(I - alpha A)^-1 f; A 1 = 1 (positive weights) so a constant f
    is a fixed point."""
    h, w = shape
    offsets = S.four_connected()
    raw = data.draw(arrays((h, w, 4), 0.05, 5))
    weights = symmetrize(raw, offsets) if symmetric else raw
    # scores, also scaled to the bottom of the normal range (issue 29: f * sqrt(d) underflowed)
    f = data.draw(arrays((h, w, 2), -10, 10, near_tiny=True)) * data.draw(st.sampled_from([1.0, 2.0 ** -1018]))
    y, info = _converged_walk(weights, f, alpha, offsets, symmetric)
    assert bool(np.all(info.converged)) and np.isfinite(np.asarray(y)).all()
    m = dense(weights, offsets)
    a = m / m.sum(axis=1, keepdims=True)  # every pixel has a neighbour inside (H·W >= 2)
    exact = (1 - alpha) * np.linalg.solve(np.eye(h * w) - alpha * a, f.reshape(-1, 2))
    # (outputs below the normal range are flushed to zero on CPU: atol includes 2 tiny)
    close(np.asarray(y).reshape(-1, 2), exact, rtol=1e-7, atol=1e-8 * np.abs(f).max() + 2 * np.finfo(float).tiny)
    yc, info = _converged_walk(weights, np.full((h, w, 2), const), alpha, offsets, symmetric)
    assert bool(np.all(info.converged))
    close(yc, np.full((h, w, 2), const), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("symmetric", [False, True])
def test_rwn_converged_walk_keeps_constants_at_the_bottom_of_the_normal_range(symmetric):
    """A constant f of 8 tiny (normal) is a fixed point also where (1 - alpha) f is subnormal:
    the CPU flushes such products to zero, so the walk solves for f / s (s a power of two) and
    scales back (the case hypothesis found for the non-symmetric walk: y was 0)."""
    offsets = S.four_connected()
    f = np.full((1, 5, 2), 8 * np.finfo(float).tiny)
    y, info = _converged_walk(np.ones((1, 5, 4)), f, 0.9375, offsets, symmetric)
    assert bool(np.all(info.converged))
    close(y, f, rtol=1e-8, atol=0)


# --------------------------------------------------------------------------- RAWKS

NUM_LABELS = 3
_hitting = jax.jit(functools.partial(rawks.hitting_probabilities, num_labels=NUM_LABELS))


@st.composite
def seed_maps(draw, shape):
    kind = draw(st.sampled_from(["empty", "one", "all", "random"]))
    h, w = shape
    if kind == "empty":
        seeds = np.full(shape, -1)
    elif kind == "one":
        seeds = np.full(shape, -1)
        seeds[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = draw(st.integers(0, NUM_LABELS - 1))
    else:
        low = 0 if kind == "all" else -1
        seeds = draw(hnp.arrays(np.int64, shape, elements=st.integers(low, NUM_LABELS - 1)))
    return kind, seeds.astype(np.int32)


@given(shapes(), st.data())
def test_rawks_probabilities_sum_to_one_and_are_one_hot_at_seeds(shape, data):
    """Eq. 8: P = Z / sum_l Z is a distribution at every pixel, one-hot at labelled pixels,
    uniform without seeds, and the seed's label everywhere with a single seed."""
    kind, seeds = data.draw(seed_maps(shape))
    boundary = data.draw(arrays(shape, 0, 30))
    p = np.asarray(_hitting(boundary, seeds))
    assert p.shape == shape + (NUM_LABELS,) and np.isfinite(p).all()
    assert (p >= 0).all() and (p <= 1 + 1e-12).all()
    close(p.sum(-1), 1.0, rtol=1e-12)
    labelled = seeds >= 0
    close(p[labelled], np.eye(NUM_LABELS)[seeds[labelled]], rtol=0, atol=1e-12)
    if kind == "empty":
        close(p, 1 / NUM_LABELS, rtol=1e-12)
    if kind == "one":
        close(p, np.broadcast_to(np.eye(NUM_LABELS)[seeds.max()], p.shape), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- SPN


@functools.partial(jax.jit, static_argnames=("direction", "merge"))
def _spn_outputs(x, gates, xs, direction, merge):
    d = spn.DIRECTIONS.index(direction)
    return (spn.propagate(x, gates[d], direction=direction), spn.spn(x, gates, merge=merge),
            spn.propagate(xs, jnp.abs(gates[d]), direction=direction))


@given(shapes(), st.sampled_from(spn.DIRECTIONS), st.sampled_from([1, 3]), st.sampled_from(["max", "mean"]),
       st.data())
def test_spn_theorem1_constant_map_is_a_fixed_point_after_stabilize(shape, direction, g, merge, data):
    """Seed 002 Theorem 1 with Theorem 3's rescaling: gates summing past 1 in absolute value
    are stabilised (sum_k |p_k| <= 1) and a constant map passes through one direction and
    through the four-direction layer unchanged. With nonnegative stabilised gates every
    output is a convex combination of inputs."""
    h, w = shape
    c = 2
    raw = data.draw(arrays((4, h, w, c, g), -3, 3))
    gates = np.asarray(spn.stabilize(raw))
    assert (np.abs(gates).sum(-1) <= 1 + 1e-12).all()
    small = np.abs(raw).sum(-1, keepdims=True) <= 1
    close(np.where(small, gates, 0), np.where(small, raw, 0), rtol=0, atol=0)  # unchanged when within bound
    value = data.draw(arrays((c,), -5, 5))
    x = np.broadcast_to(value, (h, w, c)).copy()
    xs = data.draw(arrays((h, w, c), -5, 5))
    one, layer, mixed = (np.asarray(a) for a in _spn_outputs(x, gates, xs, direction, merge))
    assert np.isfinite(one).all() and np.isfinite(layer).all() and np.isfinite(mixed).all()
    close(one, x, rtol=1e-12, atol=1e-12)
    close(layer, x, rtol=1e-12, atol=1e-12)
    assert (mixed >= xs.min() - 1e-12).all() and (mixed <= xs.max() + 1e-12).all()


# --------------------------------------------------------------------------- GCRF / GMF


@st.composite
def gcrf_problems(draw, shapes_=SOLVER_SHAPES, k=2):
    h, w = draw(st.sampled_from(shapes_))
    offsets = gcrf.bipartite_offsets(1, pattern=draw(st.sampled_from(["odd", "odd_columns"])))
    unary = draw(arrays((h, w, k), -5, 5))
    similarity = 0.5 * symmetrize(draw(arrays((h, w, len(offsets)), 0, 1)), offsets)
    r = draw(arrays((k, k), -1, 1))
    lower = np.tril(r)
    compat = lower @ lower.T
    compat = 0.5 * (compat + compat.T)
    return unary, similarity, compat, offsets


@given(gcrf_problems(k=3), st.integers(1, 3), st.data())
def test_gmf_half_updates_never_increase_the_energy(problem, layers, data):
    """Seed 003 §3.2: each half-update minimises eq. 1 exactly over its column parity."""
    unary, similarity, compat, offsets = problem
    mu = data.draw(arrays(unary.shape, -10, 10))
    energies = [float(gcrf.energy(mu, unary, similarity, compat, offsets))]
    for _ in range(layers):
        for parity in (0, 1):
            mu = gcrf.gmf_half_update(mu, unary, similarity, compat, offsets, parity=parity)
            assert np.isfinite(np.asarray(mu)).all()
            energies.append(float(gcrf.energy(mu, unary, similarity, compat, offsets)))
    e = np.array(energies)
    assert np.all(np.diff(e) <= 1e-10 * np.abs(e[:-1]).max() + 1e-12), e


@given(gcrf_problems())
def test_gmf_converged_is_the_dense_solve(problem):
    """(I + L_s ⊗ C) y = r, L_s = diag(S) - s the graph Laplacian (seed 003, eq. 1-2)."""
    unary, similarity, compat, offsets = problem
    h, w, k = unary.shape
    y, info = gcrf.gmf(unary, similarity, compat, offsets, tol=1e-13, max_iters=5000, return_info=True)
    assert bool(np.all(info.converged)) and np.isfinite(np.asarray(y)).all()
    s = dense(similarity, offsets)
    lap = np.diag(s.sum(axis=1)) - s
    exact = np.linalg.solve(np.eye(h * w * k) + np.kron(lap, compat), unary.reshape(-1)).reshape(h, w, k)
    close(y, exact, rtol=1e-7, atol=1e-9 * max(1.0, np.abs(unary).max()))


# --------------------------------------------------------------------------- dilated affinity


def ref_propagate(probs, logits, offsets, lam, mu, iterations):
    """Eq. 6 by the dense gate matrix; None if some pixel's update has zero mass."""
    h, w, c = probs.shape
    gates = dense(1 / (1 + np.exp(-mu * logits)), offsets)
    p = probs.reshape(-1, c)
    for _ in range(iterations):
        q = lam * p * p.max(-1, keepdims=True) + gates @ p
        mass = q.sum(-1, keepdims=True)
        if (mass == 0).any():
            return None
        p = q / mass
    return p.reshape(h, w, c)


@given(shapes(), st.sampled_from([(1,), (2,), (1, (1, 2))]), st.sampled_from([0, 1, 3]), finite(0, 10), finite(0, 10),
       st.booleans(), st.data())
def test_dilated_propagate_rows_sum_to_one(shape, rates, iterations, lam, mu, zeros, data):
    """Eq. 6: after an iteration every pixel is a distribution (rows sum to 1) — or, where
    a pixel's update has no mass at all, a ValueError (never NaN or a made-up number)."""
    h, w = shape
    offsets = S.dilated_offsets(rates)
    probs = data.draw(arrays((h, w, 3), 0, 1))
    if zeros:  # whole pixels without mass
        probs = probs * data.draw(hnp.arrays(bool, (h, w, 1)))
    logits = data.draw(arrays((h, w, len(offsets)), -5, 5))
    expected = ref_propagate(probs, logits, offsets, lam, mu, iterations)
    if expected is None:
        with pytest.raises(ValueError, match="probs: eq. 6 divides .* zero mass"):
            dilated.propagate(probs, logits, rates, lam=lam, mu=mu, num_steps=iterations)
        return
    out = np.asarray(dilated.propagate(probs, logits, rates, lam=lam, mu=mu, num_steps=iterations))
    assert np.isfinite(out).all() and (out >= 0).all()
    close(out, expected, rtol=1e-9, atol=1e-12)
    if iterations:
        close(out.sum(-1), 1.0, rtol=1e-12)


# --------------------------------------------------------------------------- metrics


@given(shapes(), st.integers(1, 4), st.sampled_from([255, None]), st.data())
def test_confusion_matrix_counts_the_valid_pixels(shape, n, ignore, data):
    ignored = [-1, 255] if ignore == 255 else [-2, -1]
    labels = data.draw(hnp.arrays(np.int32, shape, elements=st.sampled_from(list(range(n)) + ignored)))
    pred = data.draw(hnp.arrays(np.int32, shape, elements=st.integers(0, n - 1)))
    cm = np.asarray(metrics.confusion_matrix(pred, labels, n, ignore_index=ignore))
    valid = (labels >= 0) & (labels != ignore) if ignore is not None else labels >= 0
    assert cm.shape == (n, n) and cm.sum() == valid.sum()
    np.testing.assert_array_equal(cm.sum(1), np.bincount(labels[valid], minlength=n))
    np.testing.assert_array_equal(cm.sum(0), np.bincount(pred[valid], minlength=n))
    np.testing.assert_array_equal(np.trace(cm), (valid & (pred == labels)).sum())


_confusion_oor = jax.jit(functools.partial(metrics.confusion_matrix, return_out_of_range=True),
                         static_argnames=("num_classes", "ignore_index"))


@given(shapes(), st.just(3), st.sampled_from([255, None]), st.data())  # one n: fewer compilations
def test_confusion_matrix_under_jit_counts_out_of_range_pixels(shape, n, ignore, data):
    """Issue 29: under jit, out-of-range labels and predictions are counted (never silently
    dropped); ignored pixels count nowhere; cm is that of the in-range pixels."""
    ignored = [-1, 255] if ignore == 255 else [-2, -1]
    labels = data.draw(hnp.arrays(np.int32, shape, elements=st.sampled_from(list(range(n + 2)) + ignored + [300])))
    pred = data.draw(hnp.arrays(np.int32, shape, elements=st.integers(-2, n + 1)))
    cm, oor = _confusion_oor(pred, labels, num_classes=n, ignore_index=ignore)
    counted = (labels >= 0) & (labels != ignore) if ignore is not None else labels >= 0
    label_bad = counted & (labels >= n)
    pred_bad = counted & ((pred < 0) | (pred >= n))
    np.testing.assert_array_equal(oor, [label_bad.sum(), pred_bad.sum()])
    good = counted & ~label_bad & ~pred_bad
    assert int(np.asarray(cm).sum()) == good.sum()
    np.testing.assert_array_equal(np.trace(cm), (good & (pred == labels)).sum())
    s = metrics.summarize(cm, out_of_range=oor)
    assert np.isnan(s["mean_iou"]) == (label_bad.any() or pred_bad.any() or not good.any())


@given(st.sampled_from(SOLVER_SHAPES), st.sampled_from(["negative", "nonfinite", "seed"]),
       finite(-30, -1e-9), st.sampled_from([np.nan, np.inf]), st.integers(-5, 5), st.data())
def test_rawks_bad_values_under_jit_give_nan(shape, case, negative, nonfinite, seed_value, data):
    """Issue 29: unchecked under jit, a negative or non-finite boundary or a seed outside
    -1 .. L-1 anywhere gives an all-NaN P (never a plausible one)."""
    assume(case != "seed" or not -1 <= seed_value < NUM_LABELS)
    _, seeds = data.draw(seed_maps(shape))
    boundary = data.draw(arrays(shape, 0, 30))
    y, x = data.draw(st.integers(0, shape[0] - 1)), data.draw(st.integers(0, shape[1] - 1))
    if case == "seed":
        seeds[y, x] = seed_value
    else:
        boundary[y, x] = negative if case == "negative" else nonfinite
    assert np.isnan(np.asarray(_hitting(boundary, seeds))).all()


# --------------------------------------------------------------------------- invalid values raise


@given(shapes(), st.integers(1, 4), st.one_of(st.integers(-1000, -1), st.integers(0, 1000)), st.data())
def test_confusion_matrix_rejects_out_of_range_values(shape, n, value, data):
    assume(not 0 <= value < n)
    labels = data.draw(hnp.arrays(np.int32, shape, elements=st.integers(0, n - 1)))
    pred = data.draw(hnp.arrays(np.int32, shape, elements=st.integers(0, n - 1)))
    y, x = data.draw(st.integers(0, shape[0] - 1)), data.draw(st.integers(0, shape[1] - 1))
    bad_pred = pred.copy()
    bad_pred[y, x] = value
    with pytest.raises(ValueError, match=r"^pred: expected class indices"):
        metrics.confusion_matrix(bad_pred, labels, n)
    bad_labels = labels.copy()
    bad_labels[y, x] = value
    if value >= n and value != 255:  # negative labels and 255 are ignored, not errors
        with pytest.raises(ValueError, match=r"^labels: expected class indices"):
            metrics.confusion_matrix(pred, bad_labels, n)


@given(shapes(), st.one_of(finite(-1e6, -1e-9), st.sampled_from([np.nan, np.inf, -np.inf])),
       st.sampled_from(["lam", "mu"]), st.booleans())
def test_propagate_rejects_bad_lam_and_mu(shape, value, name, as_array):
    h, w = shape
    probs = np.full((h, w, 2), 0.5)
    value = jnp.asarray(value) if as_array else value
    with pytest.raises(ValueError, match=rf"^{name}: expected a finite number >= 0"):
        dilated.propagate(probs, np.zeros((h, w, 8)), [1], **{name: value})


@given(st.sampled_from(SOLVER_SHAPES), finite(-30, -1e-9), st.integers(-5, 5), st.data())
def test_rawks_rejects_negative_boundary_and_bad_seeds(shape, negative, seed_value, data):
    boundary = data.draw(arrays(shape, 0, 30))
    seeds = np.full(shape, -1, np.int32)
    y, x = data.draw(st.integers(0, shape[0] - 1)), data.draw(st.integers(0, shape[1] - 1))
    bad = boundary.copy()
    bad[y, x] = negative
    with pytest.raises(ValueError, match=r"^boundary: expected finite values >= 0"):
        rawks.hitting_probabilities(bad, seeds, NUM_LABELS)
    if not -1 <= seed_value < NUM_LABELS:
        seeds[y, x] = seed_value
        with pytest.raises(ValueError, match=r"^seeds: expected values in -1"):
            rawks.hitting_probabilities(boundary, seeds, NUM_LABELS)


@given(shapes(), STENCILS, st.integers(1, 3))
def test_stencil_rejects_wrong_shapes_and_dtypes(shape, offsets, extra):
    h, w = shape
    x = np.zeros((h, w, 2))
    with pytest.raises(ValueError, match=r"^weights: expected shape"):
        S.apply(np.zeros((h, w, len(offsets) + extra)), x, offsets)
    with pytest.raises(ValueError, match=r"^weights: expected shape"):
        S.apply_transpose(np.zeros((h + extra, w, len(offsets))), x, offsets)
    with pytest.raises(TypeError, match=r"^x: expected a floating-point array"):
        S.apply(np.zeros((h, w, len(offsets))), x.astype(np.int32), offsets)
    with pytest.raises(ValueError, match=r"^x: expected a rank-3 array"):
        S.apply(np.zeros((h, w, len(offsets))), x[..., 0], offsets)


@given(shapes(SOLVER_SHAPES), st.one_of(finite(1.0, 1e6), finite(-1e6, -1e-9)))
def test_rwn_converged_walk_rejects_alpha_outside_unit_interval(shape, alpha):
    h, w = shape
    with pytest.raises(ValueError, match=r"^alpha: expected 0 <= alpha < 1"):
        rwn.random_walk(np.ones((h, w, 4)), np.ones((h, w, 1)), S.four_connected(), alpha=alpha)


@given(shapes(), st.sampled_from([2, 4]), st.sampled_from(spn.DIRECTIONS))
def test_spn_rejects_wrong_gate_counts(shape, g, direction):
    h, w = shape
    with pytest.raises(ValueError, match=r"^gates: expected the last axis .* to be 1 \(one-way\) or 3"):
        spn.propagate(np.zeros((h, w, 2)), np.zeros((h, w, 2, g)), direction=direction)
    with pytest.raises(ValueError, match=r"^gates: expected shape"):
        spn.propagate(np.zeros((h, w, 2)), np.zeros((h, w, 3, 3)), direction=direction)
