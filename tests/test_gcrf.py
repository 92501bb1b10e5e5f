"""Tests of rwseg.gcrf against dense solves, numpy loops and the paper's properties (seed 003)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads

from rwseg import gcrf, stencil

H, W, K, D = 5, 7, 3, 4
OFFS = gcrf.bipartite_offsets(3)


def _problem(seed, shape=(H, W), k=K, offsets=OFFS, strength=1.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=shape + (D,))
    filters = rng.normal(scale=0.4, size=(D, k))
    s = np.asarray(gcrf.pairwise_similarity(z, filters, offsets)) * strength
    compat = np.asarray(gcrf.compatibility(rng.normal(size=(k, k))))
    unary = rng.normal(size=shape + (k,))
    return unary, s, compat


def _dense_system(s, compat, offsets):
    """I + L_s (x) C as a dense matrix (jnp, differentiable), row-major pixels, classes last."""
    lap = jnp.diag(stencil.degree(s, offsets).reshape(-1)) - stencil.to_dense(s, offsets)
    return jnp.eye(lap.shape[0] * compat.shape[0]) + jnp.kron(lap, compat)


def _dense_solve(unary, s, compat, offsets=OFFS):
    a = _dense_system(s, compat, offsets)
    return jnp.linalg.solve(a, unary.reshape(-1)).reshape(unary.shape)


def _numpy_gmf(unary, s, compat, offsets, layers):
    """The paper's updates written out pixel by pixel (eq. 2, even columns then odd)."""
    mu = unary.copy()
    for _ in range(layers):
        for parity in (0, 1):
            mu = _numpy_gmf_half(mu, unary, s, compat, offsets, parity)
    return mu


def _numpy_energy(y, unary, s, compat, offsets):
    """Each unordered pair once, found by walking the stencil and keeping i < j."""
    h, w, _ = y.shape
    e = np.sum((y - unary) ** 2)
    for yy in range(h):
        for xx in range(w):
            for n, (dy, dx) in enumerate(offsets):
                j = (yy + dy, xx + dx)
                if 0 <= j[0] < h and 0 <= j[1] < w and j > (yy, xx):
                    d = y[yy, xx] - y[j]
                    e += s[yy, xx, n] * d @ compat @ d
    return e


# --------------------------------------------------------------------------- model pieces


def test_bipartite_offsets():
    offs = gcrf.bipartite_offsets(11)
    assert len(offs) == 144 and all(dy % 2 and dx % 2 for dy, dx in offs)
    assert set(offs) == {(-dy, -dx) for dy, dx in offs}
    assert max(max(abs(dy), abs(dx)) for dy, dx in offs) == 11
    cols = gcrf.bipartite_offsets(2, pattern="odd_columns")
    assert set(cols) == {(dy, dx) for dy in range(-2, 3) for dx in (-1, 1)}
    # no edge joins two pixels of the same column parity
    dense = np.asarray(stencil.to_dense(np.ones((4, 6, len(OFFS))), OFFS))
    parity = np.arange(24) % 6 % 2
    assert not np.any(dense[parity[:, None] == parity[None, :]])


def test_pairwise_similarity_matches_numpy_and_is_symmetric():
    rng = np.random.default_rng(0)
    z, filters = rng.normal(size=(4, 5, D)), rng.normal(size=(D, 2))
    s = np.asarray(gcrf.pairwise_similarity(z, filters, OFFS))
    u = z @ filters
    for y in range(4):
        for x in range(5):
            for n, (dy, dx) in enumerate(OFFS):
                inside = 0 <= y + dy < 4 and 0 <= x + dx < 5
                want = np.exp(-np.sum((u[y, x] - u[y + dy, x + dx]) ** 2)) if inside else 0.0
                assert s[y, x, n] == pytest.approx(want, rel=1e-12, abs=0)
    dense = np.asarray(stencil.to_dense(s, OFFS))
    np.testing.assert_array_equal(dense, dense.T)


def test_compatibility():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(4, 4))
    c = np.asarray(gcrf.compatibility(r))
    np.testing.assert_allclose(c, np.tril(r) @ np.tril(r).T, rtol=1e-12)
    assert np.linalg.eigvalsh(c).min() >= -1e-12
    np.testing.assert_array_equal(c, np.asarray(gcrf.compatibility(np.tril(r))))


def test_energy_matches_numpy_pairs_and_quadratic_form():
    unary, s, compat = _problem(2)
    y = np.random.default_rng(3).normal(size=unary.shape)
    got = float(gcrf.energy(y, unary, s, compat, OFFS))
    assert got == pytest.approx(_numpy_energy(y, unary, s, compat, OFFS), rel=1e-12)
    a = np.asarray(_dense_system(s, compat, OFFS))
    quad = y.ravel() @ a @ y.ravel() - 2 * unary.ravel() @ y.ravel() + unary.ravel() @ unary.ravel()
    assert got == pytest.approx(quad, rel=1e-10)


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("seed", range(4))
def test_half_updates_never_increase_energy(seed):
    rng = np.random.default_rng(100 + seed)
    shape = (int(rng.integers(2, 7)), int(rng.integers(2, 8)))
    offsets = gcrf.bipartite_offsets(int(rng.integers(1, 3)), pattern=("odd", "odd_columns")[seed % 2])
    unary, s, compat = _problem(seed, shape=shape, offsets=offsets, strength=float(rng.uniform(0.1, 20)))
    mu = rng.normal(scale=3, size=unary.shape)
    energy = jax.jit(gcrf.energy, static_argnums=4)
    energy_grad = jax.jit(jax.grad(gcrf.energy), static_argnums=4)
    half_update = jax.jit(gcrf.gmf_half_update, static_argnums=4, static_argnames="parity")
    e = float(energy(mu, unary, s, compat, offsets))
    for step in range(4):
        parity = step % 2
        mu = half_update(mu, unary, s, compat, offsets, parity=parity)
        e_new = float(energy(mu, unary, s, compat, offsets))
        assert e_new <= e + 1e-9 * abs(e)
        # exact block minimiser: the energy gradient vanishes on the updated columns
        grad = np.asarray(energy_grad(mu, unary, s, compat, offsets))
        np.testing.assert_allclose(grad[:, parity::2], 0, atol=1e-9 * max(1.0, abs(e)))
        e = e_new


def test_gmf_unrolled_matches_numpy_loop():
    unary, s, compat = _problem(4, strength=3.0)
    for layers in (0, 1, 3):
        got = gcrf.gmf(unary, s, compat, OFFS, num_steps=layers)
        np.testing.assert_allclose(np.asarray(got), _numpy_gmf(unary, s, compat, OFFS, layers), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pattern", ["odd", "odd_columns"])
def test_gmf_converged_equals_dense_solve(pattern):
    offsets = gcrf.bipartite_offsets(2, pattern=pattern)
    unary, s, compat = _problem(5, offsets=offsets, strength=2.0)
    y, info = gcrf.gmf(unary, s, compat, offsets, tol=1e-13, return_info=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(_dense_solve(unary, s, compat, offsets)), rtol=1e-9, atol=1e-11)
    assert bool(jnp.all(info.converged)) and np.all(np.asarray(info.residual) < 1e-10)
    assert 0 < int(info.iterations) < 1000


def test_gmf_converged_gradients_equal_dense_solve_gradients():
    rng = np.random.default_rng(6)
    z, filters = rng.normal(size=(H, W, D)), rng.normal(scale=0.4, size=(D, K))
    r_param, unary = rng.normal(size=(K, K)), rng.normal(size=(H, W, K))
    weights = rng.normal(size=(H, W, K))

    def loss(solver, unary, z, filters, r_param):
        s = gcrf.pairwise_similarity(z, filters, OFFS)
        y = solver(unary, s, gcrf.compatibility(r_param))
        return jnp.sum(weights * y)

    def implicit(u, s, c):
        return gcrf.gmf(u, s, c, OFFS, tol=1e-13)

    args = (unary, z, filters, r_param)
    got = jax.jit(jax.grad(lambda *a: loss(implicit, *a), argnums=(0, 1, 2, 3)))(*args)
    want = jax.grad(lambda *a: loss(_dense_solve, *a), argnums=(0, 1, 2, 3))(*args)
    for g, w_ in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=1e-7, atol=1e-9)


def test_gmf_unrolled_check_grads():
    unary, s, compat = _problem(7, shape=(3, 4))
    f = jax.jit(lambda u, s, c: gcrf.gmf(u, s, c, OFFS, num_steps=2))
    check_grads(f, (unary, s, compat), order=1, modes=("rev",))


def test_more_layers_approach_the_optimum():
    unary, s, compat = _problem(8, strength=5.0)
    exact = np.asarray(_dense_solve(unary, s, compat))
    errs = [np.abs(np.asarray(gcrf.gmf(unary, s, compat, OFFS, num_steps=n)) - exact).max() for n in (1, 5, 25)]
    assert errs[0] > errs[1] > errs[2]


def test_vmap_jit_and_float32():
    probs = [_problem(10 + b) for b in range(2)]
    ub, sb, cb = (np.stack(p) for p in zip(*probs))
    batched = jax.jit(jax.vmap(lambda u, s, c: gcrf.gmf(u, s, c, OFFS, tol=1e-13)))(ub, sb, cb)
    for b in range(2):
        np.testing.assert_allclose(np.asarray(batched[b]), np.asarray(_dense_solve(ub[b], sb[b], cb[b])), rtol=1e-9, atol=1e-11)
    u32, s32, c32 = (a.astype(np.float32) for a in probs[0])
    y32 = gcrf.gmf(u32, s32, c32, OFFS, tol=1e-6)
    assert y32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y32), np.asarray(_dense_solve(*probs[0])), rtol=1e-3, atol=1e-4)
    g = jax.grad(lambda u: gcrf.gmf(u, s32, c32, OFFS, tol=1e-6).sum())(u32)
    assert g.dtype == jnp.float32
    assert gcrf.gmf(u32, s32, c32, OFFS, num_steps=2).dtype == jnp.float32
    assert gcrf.energy(y32, u32, s32, c32, OFFS).dtype == jnp.float32


# --------------------------------------------------------------------------- losses


def test_margin_loss():
    rng = np.random.default_rng(11)
    y = rng.normal(size=(4, 5, K))
    labels = rng.integers(0, K, size=(4, 5))
    labels[0, :2] = 255
    want = []
    for yy in range(4):
        for xx in range(5):
            l = labels[yy, xx]
            if l != 255:
                other = max(y[yy, xx, k] for k in range(K) if k != l)
                want.append(max(0.0, 0.5 - (y[yy, xx, l] - other)))
    assert float(gcrf.margin_loss(y, labels)) == pytest.approx(np.mean(want), rel=1e-12)
    assert float(gcrf.margin_loss(y, np.full((4, 5), 255))) == 0.0
    check_grads(lambda a: gcrf.margin_loss(a, labels), (y,), order=1, modes=("rev",))


def test_similarity_pretrain_loss():
    rng = np.random.default_rng(12)
    s = rng.uniform(0, 1, size=(4, 5, len(OFFS)))
    labels = rng.integers(0, 2, size=(4, 5))
    labels[1, 1] = 255
    h = math.exp(-10)
    terms = []
    for yy in range(4):
        for xx in range(5):
            for n, (dy, dx) in enumerate(OFFS):
                j = (yy + dy, xx + dx)
                if not (0 <= j[0] < 4 and 0 <= j[1] < 5) or 255 in (labels[yy, xx], labels[j]):
                    continue
                terms.append(-s[yy, xx, n] if labels[yy, xx] == labels[j] else max(0.0, s[yy, xx, n] - h))
    got = float(gcrf.similarity_pretrain_loss(s, labels, OFFS))
    assert got == pytest.approx(np.mean(terms), rel=1e-12)


# --------------------------------------------------------------------------- bad input


def test_bad_input():
    unary, s, compat = _problem(13)
    with pytest.raises(ValueError, match=r"compat: expected a square \(K, K\) matrix, got shape \(3, 2\)"):
        gcrf.gmf(unary, s, compat[:, :2], OFFS)
    with pytest.raises(ValueError, match=r"compat: expected shape \(K, K\) with K = 3 .* got \(2, 2\)"):
        gcrf.gmf(unary, s, compat[:2, :2], OFFS)
    with pytest.raises(ValueError, match=r"similarity: expected shape \(H, W, N\) with N = len\(offsets\) = 16"):
        gcrf.gmf(unary, s[..., :5], compat, OFFS)
    with pytest.raises(ValueError, match=r"similarity: expected shape .* got \(5, 6, 16\)"):
        gcrf.gmf(unary, s[:, :6], compat, OFFS)
    with pytest.raises(ValueError, match=r"offsets: expected every dx odd"):
        gcrf.gmf(unary, s, compat, [(0, 1), (0, -1), (0, 2), (0, -2)] + list(OFFS[4:]))
    with pytest.raises(ValueError, match=r"offsets: expected a symmetric stencil"):
        gcrf.gmf(unary, s[..., :1], compat, OFFS[:1])
    asym = compat + np.triu(np.ones((K, K)), 1)
    with pytest.raises(ValueError, match=r"compat: expected a symmetric matrix"):
        gcrf.gmf(unary, s, asym, OFFS)
    with pytest.raises(TypeError, match=r"unary: expected a floating-point array"):
        gcrf.gmf(unary.astype(np.int32), s, compat, OFFS)
    with pytest.raises(ValueError, match=r"r: expected a square"):
        gcrf.compatibility(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"filters: expected shape \(D, M\) with D = 4"):
        gcrf.pairwise_similarity(np.ones((3, 4, 4)), np.ones((3, 2)), OFFS)
    bad_labels = np.zeros((H, W), np.int32)
    bad_labels[1, 2] = 3
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 3\) or ignore_index=255, got 1 other values, e.g. 3"):
        gcrf.margin_loss(unary, bad_labels)
    with pytest.raises(ValueError, match=r"parity: expected 0"):
        gcrf.gmf_half_update(unary, unary, s, compat, OFFS, parity=2)


def test_checked_mode_under_jit():
    unary, s, compat = _problem(14)
    labels = np.zeros((H, W), np.int32)
    labels[2, 3] = 7
    checked = jax.jit(checkify.checkify(lambda y, l: gcrf.margin_loss(y, l, checked=True)))
    err, _ = checked(unary, labels)
    with pytest.raises(checkify.JaxRuntimeError, match=r"labels: expected values in \[0, 3\)"):
        err.throw()
    err, _ = checked(unary, np.zeros((H, W), np.int32))
    err.throw()  # no error
    asym = compat + np.triu(np.ones((K, K)), 1)
    err, _ = jax.jit(checkify.checkify(lambda c: gcrf.gmf(unary, s, c, OFFS, num_steps=1, checked=True)))(asym)
    with pytest.raises(checkify.JaxRuntimeError, match=r"compat: expected a symmetric matrix"):
        err.throw()
    # unchecked under jit: out-of-range labels are ignored like ignore_index
    got = jax.jit(gcrf.margin_loss)(unary, labels)
    ok = np.ones((H, W), bool)
    ok[2, 3] = False
    assert float(got) == pytest.approx(float(gcrf.margin_loss(unary, np.where(ok, labels, 255))), rel=1e-12)


# --------------------------------------------------------------------------- value checks (issue 9.5)


def _bad_cases():
    unary, s, compat = _problem(21)
    s_asym = s.copy()
    n = OFFS.index((-1, -1))
    s_asym[3, 3, n] *= 3  # (3, 3) -> (2, 2) is inside; its reverse entry is unchanged
    s_nan = s.copy()
    s_nan[2, 2, n] = np.nan
    return unary, s, compat, [
        ("asymmetric", (unary, s_asym, compat), r"similarity: expected s\[i, o\] == s\[i \+ o, -o\]"),
        ("nan similarity", (unary, s_nan, compat), r"similarity: expected finite values"),
        ("compat = -I", (unary, s, -np.eye(K)), r"compat: expected a positive semidefinite matrix"),
        ("nan compat", (unary, s, np.where(np.eye(K) > 0, np.nan, compat)), r"compat: expected finite values"),
    ]


def test_gmf_value_checks_eager_checkify_and_nan_when_unchecked():
    _, _, _, cases = _bad_cases()
    run = jax.jit(lambda u, s, c: gcrf.gmf(u, s, c, OFFS, return_info=True))
    checked = jax.jit(checkify.checkify(lambda u, s, c: gcrf.gmf(u, s, c, OFFS, tol=1e-12, checked=True)))
    for name, args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            gcrf.gmf(*args, OFFS)
        y, info = run(*args)
        assert bool(jnp.all(jnp.isnan(y))) and not bool(jnp.any(info.converged)), name
        err, _ = checked(*args)
        with pytest.raises(checkify.JaxRuntimeError, match=msg):
            err.throw()
    unary, s, compat, _ = _bad_cases()
    err, y = checked(unary, s, compat)
    err.throw()  # valid input: no error, the dense solution
    np.testing.assert_allclose(y, _dense_solve(unary, s, compat), rtol=1e-5, atol=1e-6)


def test_gmf_nonsymmetric_similarity_never_gives_a_wrong_gradient():
    """Issue 9.5: the implicit gradient of a non-symmetric similarity was silently wrong
    (-0.720 against a finite difference of -1.914); now it is NaN under jit (and an error eagerly)."""
    unary, s, compat, cases = _bad_cases()
    s_asym = cases[0][1][1]
    g = jax.jit(jax.grad(lambda u, s: jnp.sum(gcrf.gmf(u, s, compat, OFFS, tol=1e-13) ** 2), argnums=(0, 1)))
    g_unary, g_sim = g(unary, s_asym)
    assert bool(jnp.all(jnp.isnan(g_unary)))
    # every similarity entry the operator reads gets NaN; entries pointing outside the
    # image are ignored by the operator, so their gradient is exactly 0
    valid = stencil.valid_mask(H, W, OFFS)
    assert bool(jnp.all(jnp.isnan(g_sim[valid]))) and bool(jnp.all(g_sim[~valid] == 0))
    for part in g(unary, s):  # symmetric: finite and equal to the dense solve's gradient
        assert bool(jnp.all(jnp.isfinite(part)))
    want = jax.grad(lambda u: jnp.sum(_dense_solve(u, s, compat) ** 2))(unary)
    np.testing.assert_allclose(g(unary, s)[0], want, rtol=1e-6, atol=1e-8)


def test_gmf_nonfinite_unary_gives_nan_and_numpy_tol_is_accepted():
    unary, s, compat, _ = _bad_cases()
    y, info = jax.jit(lambda u: gcrf.gmf(u, s, compat, OFFS, return_info=True))(unary.copy() * np.where(
        np.arange(H * W * K).reshape(H, W, K) == 7, np.nan, 1.0))
    assert bool(jnp.all(jnp.isnan(y))) and not bool(jnp.any(info.converged))
    y = gcrf.gmf(unary, s, compat, OFFS, tol=np.float32(1e-12))
    np.testing.assert_allclose(y, _dense_solve(unary, s, compat), rtol=1e-8, atol=1e-9)
    with pytest.raises(ValueError, match=r"tol: expected a finite float >= 0"):
        gcrf.gmf(unary, s, compat, OFFS, tol=np.float32(np.nan))

# --------------------------------------------------------------------------- half-width half-updates (issue 8)


@pytest.mark.parametrize(
    "shape, pattern", [((4, 6), "odd_columns"), ((3, 5), "odd"), ((3, 5), "odd_columns"), ((3, 1), "odd"), ((2, 2), "odd")]
)
def test_half_width_layers_match_numpy_loop(shape, pattern):
    """Sub-grid half-updates (even and odd widths, offsets mapping to (0, 0)) equal eq. 2 pixel by pixel."""
    offsets = gcrf.bipartite_offsets(3, pattern=pattern)
    unary, s, compat = _problem(20, shape=shape, offsets=offsets, strength=2.0)
    got = gcrf.gmf(unary, s, compat, offsets, num_steps=2)
    np.testing.assert_allclose(np.asarray(got), _numpy_gmf(unary, s, compat, offsets, 2), rtol=1e-10, atol=1e-12)
    mu = np.random.default_rng(21).normal(size=unary.shape)
    for parity in (0, 1):
        half = np.asarray(gcrf.gmf_half_update(mu, unary, s, compat, offsets, parity=parity))
        want = mu.copy()
        want[:, parity::2] = _numpy_gmf_half(mu, unary, s, compat, offsets, parity)[:, parity::2]
        np.testing.assert_allclose(half, want, rtol=1e-10, atol=1e-12)


def _numpy_gmf_half(mu, unary, s, compat, offsets, parity):
    h, w, k = unary.shape
    new = mu.copy()
    for y in range(h):
        for x in range(parity, w, 2):
            total, pull = 0.0, np.zeros(k)
            for n, (dy, dx) in enumerate(offsets):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    total += s[y, x, n]
                    pull += s[y, x, n] * mu[y + dy, x + dx]
            new[y, x] = np.linalg.solve(np.eye(k) + total * compat, unary[y, x] + compat @ pull)
    return new


def test_out_of_image_similarity_is_ignored():
    """NaN / inf similarity on entries pointing outside the image changes nothing (issue 9)."""
    unary, s, compat = _problem(22)
    valid = stencil.valid_mask(H, W, OFFS)
    s_bad = np.where(valid, s, np.nan)
    s_bad[0, 0, ~valid[0, 0]] = np.inf
    for kwargs in ({"num_steps": 3}, {"tol": 1e-12}):
        got = gcrf.gmf(unary, s_bad, compat, OFFS, **kwargs)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(gcrf.gmf(unary, s, compat, OFFS, **kwargs)))
    g = jax.grad(lambda s: jnp.sum(gcrf.gmf(unary, s, compat, OFFS, num_steps=2)))(jnp.asarray(s_bad))
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[~valid] == 0)


def test_gmf_unrolled_forward_mode():
    """jvp through the unrolled layers (the stencil primitive's bilinear jvp); rev is checked above."""
    unary, s, compat = _problem(23, shape=(3, 4))
    f = jax.jit(lambda u, s, c: gcrf.gmf(u, s, c, OFFS, num_steps=2))  # traced: compat's check is skipped
    check_grads(f, (unary, s, compat), order=1, modes=("fwd",))


# --------------------------------------------------------------------------- block solves without K x K maps (issue 28)


def _compat_cases(k=K):
    """C = 0.25 I (the layer's start: every eigenvalue repeated), a PSD C with a repeated
    eigenvalue (and a zero one), a generic PSD C and C = 0."""
    rng = np.random.default_rng(30)
    q, _ = np.linalg.qr(rng.normal(size=(k, k)))
    repeated = q @ np.diag([0.0] + [1.7] * (k - 1)) @ q.T
    return {"0.25I": 0.25 * np.eye(k), "repeated": 0.5 * (repeated + repeated.T),
            "generic": np.asarray(gcrf.compatibility(rng.normal(size=(k, k)))), "zero": np.zeros((k, k))}


def _dense_inverse_gmf(unary, s, compat, offsets, layers):
    """The formulation before issue 28, written on the whole map: explicit (I + S_i C)^-1 per
    pixel (H, W, K, K, from the symmetric part of C) applied to eq. 2's right-hand side,
    even columns then odd. jnp, differentiable (through jnp.linalg.inv)."""
    h, w, k = unary.shape
    s = jnp.where(stencil.valid_mask(h, w, offsets), s, 0)
    sym = 0.5 * (compat + compat.T)
    inverse = jnp.linalg.inv(jnp.eye(k) + stencil.degree(s, offsets)[..., None, None] * sym)
    parity = (jnp.arange(w) % 2)[None, :, None]
    mu = unary
    for _ in range(layers):
        for p in (0, 1):
            new = jnp.einsum("hwkl,hwl->hwk", inverse, unary + stencil.apply(s, mu, offsets) @ compat.T)
            mu = jnp.where(parity == p, new, mu)
    return mu


@pytest.mark.parametrize("case", ["0.25I", "repeated", "generic", "zero"])
def test_block_solve_equals_the_explicit_inverse(case):
    """U ((U^T v) / (1 + S lambda)) equals (I + S C)^-1 v, degenerate eigenvalues included;
    its jvp equals the explicit inverse's (any direction, C's perturbation not symmetric)."""
    compat = _compat_cases()[case]
    rng = np.random.default_rng(31)
    deg, v = rng.uniform(0, 6, size=(4, 5)), rng.normal(size=(4, 5, K))
    deg[0, 0] = 0.0

    def explicit(deg, c, v):
        return jnp.einsum("...kl,...l->...k", jnp.linalg.inv(jnp.eye(K) + deg[..., None, None] * c), v)

    def ours(deg, c, v):
        sym, eig = gcrf._block_eig(c)
        return gcrf._block_solve(deg, sym, eig, v)

    np.testing.assert_allclose(np.asarray(ours(deg, compat, v)), np.asarray(explicit(deg, compat, v)), rtol=1e-12, atol=1e-13)
    tangents = (rng.normal(size=deg.shape), rng.normal(size=(K, K)), rng.normal(size=v.shape))
    tangents = (tangents[0], 0.5 * (tangents[1] + tangents[1].T), tangents[2])  # explicit(c) reads all of C
    got = jax.jvp(ours, (deg, compat, v), tangents)
    want = jax.jvp(explicit, (deg, compat, v), tangents)
    for g, w_ in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=1e-11, atol=1e-12)
    check_grads(ours, (deg, compat, v), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("case", ["0.25I", "repeated", "generic"])
def test_gmf_unrolled_equals_the_dense_inverse_formulation(case):
    """Values, gradients (unary, similarity, compat and r of C = R R^T) and a second-order
    product of the unrolled GMF equal those of the explicit per-pixel inverses."""
    compat = _compat_cases()[case]
    unary, s, _ = _problem(32, strength=2.0)
    rng = np.random.default_rng(33)
    weights = rng.normal(size=unary.shape)
    np.testing.assert_allclose(np.asarray(gcrf.gmf(unary, s, compat, OFFS, num_steps=3)),
                               np.asarray(_dense_inverse_gmf(unary, s, compat, OFFS, 3)), rtol=1e-12, atol=1e-13)

    def loss(gmf_fn):
        return lambda u, s, c: jnp.sum(weights * gmf_fn(u, s, c) ** 2)

    ours = loss(lambda u, s, c: gcrf.gmf(u, s, c, OFFS, num_steps=3))
    dense = loss(lambda u, s, c: _dense_inverse_gmf(u, s, c, OFFS, 3))
    args = (unary, s, compat)
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(*args)
    want = jax.grad(dense, argnums=(0, 1, 2))(*args)
    for g, w_ in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=1e-10, atol=1e-12)
    # second order: a Hessian-vector product (forward over reverse)
    direction = tuple(rng.normal(size=np.shape(a)) for a in args)
    direction = direction[:2] + (0.5 * (direction[2] + direction[2].T),)
    hvp = lambda f: jax.jvp(jax.grad(f, argnums=(0, 1, 2)), args, direction)[1]  # noqa: E731
    for g, w_ in zip(jax.jit(lambda: hvp(ours))(), hvp(dense)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=1e-9, atol=1e-11)
    # through the layer's parameterisation C = R R^T (R = chol-like factor of this C)
    r = np.linalg.cholesky(compat + 1e-3 * np.eye(K))
    through_r = lambda f: jax.grad(lambda r: f(unary, s, gcrf.compatibility(r)))(r)  # noqa: E731
    np.testing.assert_allclose(np.asarray(through_r(ours)), np.asarray(through_r(dense)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["0.25I", "generic"])
def test_gmf_unrolled_check_grads_second_order(case):
    """check_grads of the unrolled GMF w.r.t. unary, similarity and compat, orders 1 and 2,
    forward and reverse, at C = 0.25 I (degenerate: eigh's own derivative is infinite there)."""
    compat = _compat_cases()[case]
    unary, s, _ = _problem(34, shape=(3, 4))
    f = jax.jit(lambda u, s, c: gcrf.gmf(u, s, c, OFFS, num_steps=2))
    check_grads(f, (unary, s, compat), order=2, modes=("fwd", "rev"))


def test_no_per_pixel_k_by_k_map_in_the_unrolled_gradient():
    """Issue 28: neither the forward nor the backward pass of the unrolled GMF holds an
    (..., K, K) array per pixel (TPU pads its two minor dims to a tile); C's own (K, K) and
    its eigendecomposition are the only K x K values."""
    k = 3
    unary, s, compat = _problem(35, shape=(4, 10), k=k)
    f = lambda u, s, c: jnp.sum(gcrf.gmf(u, s, c, OFFS, num_steps=2) ** 2)  # noqa: E731
    text = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(unary, s, compat))
    assert re.search(r"\[\d+,\d+,3\]", text)  # the per-pixel K-vectors are there
    assert not re.search(rf"\[(\d+,)+{k},{k}\]", text), re.findall(rf"\w+\[(?:\d+,)+{k},{k}\]", text)[:3]
