"""rwseg.rawks against scipy.sparse solves of the paper's unscaled system (eq. 7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from jax.experimental import checkify
from jax.test_util import check_grads

from rwseg import rawks
from rwseg.data import scribbles_from_labels

H, W, L = 7, 8, 3

# shared jitted entry points: identical shapes/dtypes reuse one compilation across tests
HP = jax.jit(rawks.hitting_probabilities, static_argnames=("num_labels", "tol", "return_info"))


@jax.jit
def grad_p0_squared(b, s):
    return jax.grad(lambda b: jnp.sum(rawks.hitting_probabilities(b, s, L)[..., 0] ** 2))(b)


def _problem(seed=0, high=3.0, frac=0.12, labels=L):
    rng = np.random.default_rng(seed)
    b = rng.uniform(0, high, (H, W))
    s = np.full((H, W), -1)
    idx = rng.choice(H * W, size=max(labels, int(frac * H * W)), replace=False)
    s.flat[idx] = rng.integers(0, labels, idx.size)
    s.flat[idx[:labels]] = np.arange(labels)  # every label present
    return b, s


def _paper_system(seeds, num_labels):
    """Unlabelled index, adjacency among unlabelled pixels, and per-label source counts."""
    h, w = seeds.shape
    unl = np.flatnonzero(seeds.ravel() < 0)
    pos = {p: i for i, p in enumerate(unl)}
    rows, cols = [], []
    src = np.zeros((unl.size, num_labels))
    for i, p in enumerate(unl):
        y, x = divmod(p, w)
        for dy, dx in ((-1, 0), (0, -1), (0, 1), (1, 0)):
            yy, xx = y + dy, x + dx
            if 0 <= yy < h and 0 <= xx < w:
                q = yy * w + xx
                if seeds[yy, xx] < 0:
                    rows.append(i)
                    cols.append(pos[q])
                else:
                    src[i, seeds[yy, xx]] += 1
    adj = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(unl.size, unl.size))
    return unl, adj, src


def scipy_probabilities(boundary, seeds, num_labels):
    """P by scipy.sparse.linalg.spsolve of diag(4 e^B) - adjacency, float64."""
    unl, adj, src = _paper_system(seeds, num_labels)
    a = (sp.diags(4 * np.exp(boundary.ravel()[unl])) - adj).tocsc()
    z = np.zeros((seeds.size, num_labels))
    z[unl] = spla.spsolve(a, src).reshape(unl.size, num_labels)
    lab = seeds.ravel() >= 0
    z[lab, seeds.ravel()[lab]] = 1
    return (z / z.sum(1, keepdims=True)).reshape(seeds.shape + (num_labels,))


def dense_probabilities(boundary, seeds, num_labels):
    """The same in jnp with a dense solve (differentiable oracle for gradients)."""
    unl, adj, src = _paper_system(seeds, num_labels)
    a = jnp.diag(4 * jnp.exp(boundary.ravel()[unl])) - jnp.asarray(adj.toarray())
    zu = jnp.linalg.solve(a, jnp.asarray(src))
    lab = seeds.ravel() >= 0
    z = jnp.zeros((seeds.size, num_labels)).at[unl].set(zu)
    z = z.at[np.flatnonzero(lab), seeds.ravel()[lab]].set(1.0)
    return (z / z.sum(1, keepdims=True)).reshape(seeds.shape + (num_labels,))


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_scipy_spsolve(seed):
    b, s = _problem(seed)
    p, info = HP(jnp.asarray(b), jnp.asarray(s), L, tol=1e-11, return_info=True)
    np.testing.assert_allclose(p, scipy_probabilities(b, s, L), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(jnp.sum(p, -1), 1.0, rtol=1e-12)
    lab = s >= 0
    np.testing.assert_array_equal(np.asarray(p)[lab], np.eye(L)[s[lab]])
    assert bool(jnp.all(info.reachable)) and bool(jnp.all(info.solve.converged))


def test_gradients_match_dense_oracle_and_check_grads():
    b, s = _problem(2)
    g = np.random.default_rng(3).normal(size=(H, W, L))

    @jax.jit
    def loss(b):
        return jnp.sum(g * rawks.hitting_probabilities(b, s, L, tol=1e-13))

    got = jax.grad(loss)(jnp.asarray(b))
    want = jax.grad(lambda b: jnp.sum(g * dense_probabilities(b, s, L)))(jnp.asarray(b))
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-11)
    check_grads(loss, (jnp.asarray(b),), order=1, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)
    # the backward pass is an implicit (adjoint) solve, not an unrolled loop
    assert str(jax.make_jaxpr(jax.grad(loss))(jnp.asarray(b))).count("custom_linear_solve") >= 1


def test_raising_boundary_on_a_line_moves_probability_across_it():
    b = np.full((H, W), 0.1)
    s = np.full((H, W), -1)
    s[:, 0] = 0
    s[:, W - 1] = 1
    p0 = np.asarray(HP(jnp.asarray(b), jnp.asarray(s), 2, tol=1e-10))
    b2 = b.copy()
    b2[:, 4] = 5.0  # a wall in column 4, between the two seed columns
    p1 = np.asarray(HP(jnp.asarray(b2), jnp.asarray(s), 2, tol=1e-10))
    assert np.all(p1[:, 1:4, 0] > p0[:, 1:4, 0])  # left of the wall: more label 0
    assert np.all(p1[:, 5:W - 1, 1] > p0[:, 5:W - 1, 1])  # right of the wall: more label 1
    # and the gradient says the same: raising B in column 4 increases P_0 left of it
    grad = jax.jit(jax.grad(lambda b: rawks.hitting_probabilities(b, s, 2, tol=1e-12)[3, 2, 0]))(jnp.asarray(b))
    assert float(grad[3, 4]) > 0


def test_single_seed_no_seed_and_uncertainty_weights():
    b, _ = _problem(4)
    s = np.full((H, W), -1)
    s[3, 3] = 1
    p, info = HP(jnp.asarray(b, jnp.float32), jnp.asarray(s), L, return_info=True)
    np.testing.assert_allclose(p[..., 1], 1.0, rtol=1e-6)
    assert bool(jnp.all(info.reachable))
    w = rawks.uncertainty_weights(p, temperature=2.0, reachable=info.reachable)
    np.testing.assert_allclose(w, 1.0, rtol=1e-5)
    none = np.full((H, W), -1)
    p, info = HP(jnp.asarray(b, jnp.float32), jnp.asarray(none), L, return_info=True)
    np.testing.assert_allclose(p, 1 / L, rtol=1e-7)
    assert not bool(jnp.any(info.reachable))
    assert float(jnp.max(rawks.uncertainty_weights(p, temperature=2.0, reachable=info.reachable))) == 0.0
    np.testing.assert_allclose(rawks.uncertainty_weights(p, temperature=2.0), L ** -2.0, rtol=1e-6)
    g = grad_p0_squared(jnp.asarray(b, jnp.float32), jnp.asarray(none))
    assert bool(jnp.all(jnp.isfinite(g)))


def test_large_boundary_and_far_seeds_float32_match_float64_oracle():
    """B up to 30: Z ~ e^-200 underflows float32; P is still right (no NaN, no uniform)."""
    rng = np.random.default_rng(5)
    b = rng.uniform(0, 30, (H, W))
    s = np.full((H, W), -1)
    s[0, 0], s[H - 1, W - 1], s[0, W - 1] = 0, 1, 2
    want = scipy_probabilities(b, s, L)  # float64, Z down to ~1e-100
    p32, info = HP(jnp.asarray(b, jnp.float32), jnp.asarray(s), L, return_info=True)
    assert p32.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(p32)))
    assert bool(jnp.all(info.reachable)) and bool(jnp.all(info.solve.converged))
    approx = np.asarray(info.approximate)
    assert 0 < approx.sum() < approx.size  # this map needs the underflow fallback somewhere
    np.testing.assert_allclose(np.asarray(p32)[~approx], want[~approx], atol=1e-5)
    # where u underflows float32, the path-cost approximation agrees with the exact answer
    np.testing.assert_array_equal(np.argmax(np.asarray(p32)[approx], -1), np.argmax(want[approx], -1))
    g = grad_p0_squared(jnp.asarray(b, jnp.float32), jnp.asarray(s))
    assert bool(jnp.all(jnp.isfinite(g)))
    # far seeds on a flat map, one label on each side: Z ~ e^-130 in the middle
    bb = np.full((12, 60), 2.0)
    ss = np.full((12, 60), -1)
    ss[6, 0], ss[6, 59] = 0, 1
    ref = scipy_probabilities(bb, ss, 2)
    for dtype in (np.float32, np.float64):
        p, info = HP(jnp.asarray(bb, dtype), jnp.asarray(ss), 2, return_info=True)
        assert bool(jnp.all(info.reachable)) and bool(jnp.all(jnp.isfinite(p)))
        ok = ~np.asarray(info.approximate)
        np.testing.assert_allclose(np.asarray(p)[ok], ref[ok], atol=1e-5)
        np.testing.assert_allclose(p[:, :30, 0], p[:, ::-1][:, :30, 1], atol=1e-4)  # mirror symmetry
        assert float(p[6, 20, 0]) > 0.99 and float(p[6, 39, 1]) > 0.99


def test_float32_gradient_where_sum_of_u_is_tiny_but_resolved():
    """Regression (RAWKS training, step 120): a pocket of low B behind four columns of
    B = 10, away from both seeds. There sum_l u ~ 1e-22 (scaled system): far above the
    underflow floor (~1e-31, so the pixels are exact, not ``approximate``) but below
    ~5e-20, where the VJP of a plain ``u / sum_l u`` formed ``(sum_l u)**-2 = inf`` in
    float32. That put inf / NaN in the adjoint right-hand side: the B-gradient came out
    NaN (spread by the adjoint solve over the whole image) or, when the refinement never
    started, silently zero. It must be finite and match the float64 dense oracle."""
    b = np.full((2, 8), 10.0)
    b[:, :2] = [[0.3, 0.7], [0.5, 0.2]]
    b[:, 6:] = [[0.4, 0.1], [0.6, 0.9]]  # the pocket
    s = np.full((2, 8), -1)
    s[0, 0], s[1, 0] = 0, 1
    logits = np.random.default_rng(7).normal(size=(2, 8, 2))

    def loss(b, probs):  # the training loss (eq. 11) through P
        return rawks.rawks_loss(probs(b), jnp.asarray(logits, b.dtype), temperature=1.0)

    b32 = jnp.asarray(b, jnp.float32)
    p, info = HP(b32, jnp.asarray(s), 2, return_info=True)
    p_want = dense_probabilities(jnp.asarray(b), s, 2)
    assert not bool(jnp.any(info.approximate))  # every pixel is resolved: all get gradient
    np.testing.assert_allclose(p, p_want, atol=1e-5)
    np.testing.assert_allclose(p[1, 6:, 0], [0.185, 0.272], atol=1e-3)  # the pocket: not one-hot
    got = jax.jit(jax.grad(lambda b: loss(b, lambda b: rawks.hitting_probabilities(b, s, 2))))(b32)
    want = jax.grad(lambda b: loss(b, lambda b: dense_probabilities(b, s, 2)))(jnp.asarray(b))
    assert got.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_allclose(got, want, atol=1e-4 * float(jnp.max(jnp.abs(want))))
    assert float(jnp.max(jnp.abs(got[:, 6:]))) > 0.1 * float(jnp.max(jnp.abs(want)))  # the pocket moves


def test_jit_vmap_batch_with_different_seeds():
    probs = [_problem(k) for k in range(3)]
    bs = np.stack([b for b, _ in probs])
    ss = np.stack([s for _, s in probs])
    ss[2] = -1  # one image without seeds
    f = jax.jit(jax.vmap(lambda b, s: rawks.hitting_probabilities(b, s, L, tol=1e-10)))
    for dtype, tol in ((np.float64, 1e-8), (np.float32, 1e-4)):
        p = f(jnp.asarray(bs, dtype), jnp.asarray(ss))
        assert p.dtype == dtype
        for k in range(2):
            np.testing.assert_allclose(p[k], scipy_probabilities(bs[k], ss[k], L), atol=tol)
        np.testing.assert_allclose(p[2], 1 / L, rtol=1e-6)
    gl = jax.jit(jax.vmap(jax.grad(lambda b, s: jnp.sum(rawks.hitting_probabilities(b, s, L)[..., 0] ** 2))))
    assert bool(jnp.all(jnp.isfinite(gl(jnp.asarray(bs, np.float32), jnp.asarray(ss)))))


def test_bad_seeds_and_checked_mode():
    b, s = _problem(0)
    bad = s.copy()
    bad[0, 0] = L
    with pytest.raises(ValueError, match=r"seeds: expected values in -1 \(unlabelled\) .. 2"):
        rawks.hitting_probabilities(jnp.asarray(b), jnp.asarray(bad), L)
    with pytest.raises(TypeError, match="seeds: expected an integer"):
        rawks.hitting_probabilities(jnp.asarray(b), jnp.asarray(s, jnp.float32), L)
    with pytest.raises(ValueError, match="boundary: expected finite values >= 0"):
        rawks.hitting_probabilities(jnp.asarray(-b), jnp.asarray(s), L)
    with pytest.raises(ValueError, match="seeds: expected shape"):
        rawks.hitting_probabilities(jnp.asarray(b), jnp.asarray(s[:-1]), L)
    checked = checkify.checkify(jax.jit(lambda b, s: rawks.hitting_probabilities(b, s, L, checked=True)))
    err, _ = checked(jnp.asarray(b), jnp.asarray(bad))
    with pytest.raises(Exception, match="seeds: expected values in -1"):
        err.throw()
    err, p = checked(jnp.asarray(b), jnp.asarray(s))
    err.throw()  # no error for valid seeds


def test_rawks_loss_matches_numpy_and_weight_gradient_option():
    rng = np.random.default_rng(6)
    p = rng.dirichlet(np.ones(L), (H, W))
    p[0, 0] = [1.0, 0.0, 0.0]  # one-hot (seed) pixel: 0 log 0 = 0
    logits = rng.normal(size=(H, W, L))
    alpha = 1.5
    q = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0)
        ent = -plogp.sum(-1)
        kl = (plogp - p * np.log(q)).sum(-1)
    want = np.mean(np.exp(-alpha * ent) * kl + ent)
    got = rawks.rawks_loss(jnp.asarray(p), jnp.asarray(logits), temperature=alpha)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    f = lambda p, wg: rawks.rawks_loss(p, jnp.asarray(logits), temperature=alpha, weight_gradient=wg)  # noqa: E731
    g1 = jax.grad(f)(jnp.asarray(p), True)
    g0 = jax.grad(f)(jnp.asarray(p), False)
    assert bool(jnp.all(jnp.isfinite(g1))) and not np.allclose(g1, g0)
    np.testing.assert_allclose(jax.grad(lambda z: f(z, False))(jnp.asarray(p))[1:], g0[1:])
    # the logits gradient is w (P - Q) / (H W): the weight multiplies only the KL term
    gl = jax.grad(lambda z: rawks.rawks_loss(jnp.asarray(p), z, temperature=alpha))(jnp.asarray(logits))
    np.testing.assert_allclose(gl, np.exp(-alpha * ent)[..., None] * (q - p) / (H * W), rtol=1e-9, atol=1e-15)


def test_rawks_loss_hard_targets_match_numpy_and_stop_at_p():
    """targets="hard": cross-entropy of Q against argmax P where w = exp(-alpha H(P)) >= 1/2 (P does
    not abstain), 0 elsewhere, over all pixels; no gradient reaches P; an unknown mode is refused."""
    rng = np.random.default_rng(16)
    p = rng.dirichlet(np.full(L, 0.3), (H, W))  # a mix of confident and uncertain pixels
    logits = rng.normal(size=(H, W, L))
    alpha = 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0).sum(-1)
    keep = np.exp(-alpha * ent) >= 0.5
    assert 0 < keep.sum() < H * W  # both cases occur
    log_q = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    label = p.argmax(-1)
    ce = -np.take_along_axis(log_q, label[..., None], -1)[..., 0]
    f = lambda pp, z: rawks.rawks_loss(pp, z, temperature=alpha, targets="hard")  # noqa: E731
    np.testing.assert_allclose(f(jnp.asarray(p), jnp.asarray(logits)), np.mean(np.where(keep, ce, 0)), rtol=1e-12)
    gp, gl = jax.grad(f, argnums=(0, 1))(jnp.asarray(p), jnp.asarray(logits))
    assert float(jnp.max(jnp.abs(gp))) == 0.0
    want = keep[..., None] * (np.exp(log_q) - np.eye(L)[label]) / (H * W)
    np.testing.assert_allclose(gl, want, rtol=1e-9, atol=1e-15)
    check_grads(lambda z: f(jnp.asarray(p), z), (jnp.asarray(logits),), order=1, modes=("rev",))
    bad = p.copy()
    bad[2, 3] = np.nan  # unchecked, a NaN in P shows in the loss for both modes
    for mode in ("soft", "hard"):
        assert np.isnan(rawks.rawks_loss(jnp.asarray(bad), jnp.asarray(logits), temperature=alpha, targets=mode))
    with pytest.raises(ValueError, match=r"targets: expected 'soft' \(eq. 11\) or 'hard'.*got 'argmax'"):
        rawks.rawks_loss(jnp.asarray(p), jnp.asarray(logits), temperature=alpha, targets="argmax")


def test_scribbles_from_labels():
    labels = np.zeros((40, 50), np.int64)
    labels[:, 25:] = 1
    labels[10:30, 5:15] = 2
    labels[35:, :3] = 3  # a thin region (3 px): scribbles anyway
    labels[0, 49] = 255
    key = jax.random.key(0)
    seeds = scribbles_from_labels(labels, key, density=0.03)
    assert seeds.shape == labels.shape and seeds.dtype == np.int32
    lab = seeds >= 0
    assert np.all(seeds[lab] == labels[lab])  # seeds lie on their label
    assert set(np.unique(seeds[lab])) == {0, 1, 2, 3}  # at least one stroke per region
    assert 0.01 < lab.mean() < 0.08
    np.testing.assert_array_equal(seeds, scribbles_from_labels(labels, key, density=0.03))
    assert not np.array_equal(seeds, scribbles_from_labels(labels, jax.random.key(1), density=0.03))
    dense = scribbles_from_labels(labels, key, density=0.2)
    assert (dense >= 0).sum() > 2 * lab.sum()
    with pytest.raises(ValueError, match="density"):
        scribbles_from_labels(labels, key, density=0.0)
    # propagated scribbles recover the dense labels when B is high on the label edges
    edges = np.zeros(labels.shape)
    edges[:-1] += 4.0 * (labels[:-1] != labels[1:])
    edges[1:] += 4.0 * (labels[:-1] != labels[1:])
    edges[:, :-1] += 4.0 * (labels[:, :-1] != labels[:, 1:])
    edges[:, 1:] += 4.0 * (labels[:, :-1] != labels[:, 1:])
    ok = labels != 255
    acc = [np.mean(np.argmax(np.asarray(HP(jnp.asarray(edges), jnp.asarray(sd), 4)),
                             -1)[ok] == labels[ok]) for sd in (seeds, dense)]
    assert acc[0] > 0.75 and acc[1] > 0.95


def test_nan_boundary_under_jit_gives_nan_never_a_plausible_p():
    """Issue 9: a NaN in B made the refinement stop at its zero start, and the path-cost
    fallback then returned a valid-looking P. Now P is NaN and the solve is not converged."""
    b, s = _problem(3)
    b = b.copy()
    b[3, 4] = np.nan
    s[3, 4] = -1
    p, info = HP(b, s, num_labels=L, return_info=True)
    assert bool(jnp.all(jnp.isnan(p))) and not bool(jnp.any(info.solve.converged))
    with pytest.raises(ValueError, match="boundary: expected finite values"):
        rawks.hitting_probabilities(b, s, L)


_CHECKED = checkify.checkify(jax.jit(lambda b, s: rawks.hitting_probabilities(b, s, L, checked=True)))


@pytest.mark.parametrize("case", ["negative", "minus_five_everywhere", "inf", "seed_too_large",
                                  "seed_below_minus_one", "only_bad_seeds"])
def test_bad_values_under_jit_give_nan_and_not_converged(case):
    """Issue 29: unchecked under jit, ``boundary = -5`` gave a checkerboard P with
    ``converged=True`` and a seed >= num_labels was absorbed without a trace. Now every bad
    value gives an all-NaN P and ``converged`` False for every label (the shared HP jit)."""
    b, s = _problem(4)
    b, s = b.copy(), s.copy()
    if case == "negative":
        b[2, 5] = -0.5
    elif case == "minus_five_everywhere":
        b[:] = -5.0
    elif case == "inf":
        b[1, 1] = np.inf
    elif case == "seed_too_large":
        s[0, 0] = L
    elif case == "seed_below_minus_one":
        s[6, 7] = -2
    else:  # no valid seed at all: P used to be uniform (no label reachable)
        s[:] = -1
        s[3, 3] = L + 4
    p, info = HP(jnp.asarray(b), jnp.asarray(s), num_labels=L, return_info=True)
    assert bool(jnp.all(jnp.isnan(p))), case
    assert not bool(jnp.any(info.solve.converged)), case
    # the checked mode reports the same input
    err, _ = _CHECKED(jnp.asarray(b), jnp.asarray(s))
    with pytest.raises(Exception, match="seeds: expected values|boundary: expected finite values"):
        err.throw()

