"""rwseg.rwn against numpy loops and dense matrices built with stencil.to_dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rwseg import rwn, stencil

H, W, C = 6, 7, 3
OFFS = stencil.disk_offsets(2)


def _features(seed=0, ch=4, dtype=np.float64):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(H, W, ch)), dtype)


def _sym_weights(seed=0, dtype=np.float64):
    """Affinities from feature distances: symmetric by construction."""
    d = rwn.feature_distances(_features(seed, dtype=dtype), OFFS)
    return rwn.affinity(d, jnp.asarray([-0.5, -1.0, -0.2, -0.7], dtype), OFFS)


def _nonsym_weights(seed=0, dtype=np.float64):
    w = np.random.default_rng(seed + 10).uniform(0.05, 1.0, (H, W, len(OFFS)))
    w[2, 3] = 0.0  # a pixel whose row has zero degree
    return jnp.asarray(w, dtype)


def _scores(seed=1, dtype=np.float64):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(H, W, C)), dtype)


def _dense_A(w):
    m = stencil.to_dense(w, OFFS)
    deg = jnp.sum(m, axis=1, keepdims=True)
    return jnp.where(deg > 0, m / jnp.where(deg > 0, deg, 1), 0)


def _dense_limit(w, f, alpha):
    a = _dense_A(w)
    y = jnp.linalg.solve(jnp.eye(H * W) - alpha * a, f.reshape(H * W, C))
    return ((1 - alpha) * y).reshape(f.shape)


def test_feature_distances_and_affinity_match_loops():
    feats = np.asarray(_features())
    theta = np.array([-0.5, -1.0, -0.2, -0.7])
    d = np.asarray(rwn.feature_distances(jnp.asarray(feats), OFFS))
    w = np.asarray(rwn.affinity(jnp.asarray(d), jnp.asarray(theta), OFFS))
    assert d.shape == (H, W, len(OFFS), 4) and w.shape == (H, W, len(OFFS))
    for y in range(H):
        for x in range(W):
            for k, (dy, dx) in enumerate(OFFS):
                yy, xx = y + dy, x + dx
                if 0 <= yy < H and 0 <= xx < W:
                    want = np.abs(feats[y, x] - feats[yy, xx])
                    np.testing.assert_allclose(d[y, x, k], want, rtol=1e-12)
                    np.testing.assert_allclose(w[y, x, k], np.exp(theta @ want), rtol=1e-12)
                else:
                    assert np.all(d[y, x, k] == 0) and w[y, x, k] == 0
    m = np.asarray(stencil.to_dense(jnp.asarray(w), OFFS))
    np.testing.assert_allclose(m, m.T, rtol=1e-12)  # RWN affinities are symmetric


@pytest.mark.parametrize("steps,alpha", [(1, 1.0), (3, 0.7), (0, 0.5)])
def test_steps_match_dense_iteration(steps, alpha):
    w, f = _nonsym_weights(), _scores()
    a = np.asarray(_dense_A(w))
    assert np.all(a[2 * W + 3] == 0)  # the zero-degree row stays zero
    y = np.asarray(f).reshape(H * W, C)
    f0 = y.copy()
    for _ in range(steps):
        y = alpha * a @ y + (1 - alpha) * f0
    got = rwn.random_walk(w, f, OFFS, alpha=alpha, num_steps=steps)
    np.testing.assert_allclose(got, y.reshape(H, W, C), rtol=1e-10, atol=1e-12)
    if steps == 1 and alpha == 1.0:  # the training layer y = A f
        np.testing.assert_allclose(rwn.transition(w, f, OFFS), got, rtol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_converged_walk_matches_dense_inverse(symmetric):
    w = _sym_weights() if symmetric else _nonsym_weights()
    f = _scores()
    for alpha in (0.01, 0.9):
        y, info = rwn.random_walk(w, f, OFFS, alpha=alpha, symmetric=symmetric, tol=1e-11,
                                  return_info=True)
        np.testing.assert_allclose(y, _dense_limit(w, f, alpha), rtol=1e-8, atol=1e-10)
        assert bool(jnp.all(info.converged))
    # the limit of the iteration
    many = rwn.random_walk(w, f, OFFS, alpha=0.5, num_steps=60)
    np.testing.assert_allclose(rwn.random_walk(w, f, OFFS, alpha=0.5, symmetric=symmetric, tol=1e-11),
                               many, rtol=1e-7, atol=1e-9)


def test_symmetric_and_general_solvers_agree_with_zero_degree_pixel():
    w = np.array(_sym_weights())
    # isolate pixel (2, 3): zero its row and its column (keeps W symmetric)
    m_idx = {o: k for k, o in enumerate(OFFS)}
    w[2, 3] = 0
    for (dy, dx), k in m_idx.items():
        if 0 <= 2 + dy < H and 0 <= 3 + dx < W:
            w[2 + dy, 3 + dx, m_idx[(-dy, -dx)]] = 0
    w, f = jnp.asarray(w), _scores()
    y_s = rwn.random_walk(w, f, OFFS, alpha=0.8, symmetric=True, tol=1e-11)
    y_n = rwn.random_walk(w, f, OFFS, alpha=0.8, symmetric=False, tol=1e-11)
    np.testing.assert_allclose(y_s, y_n, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(y_s[2, 3], 0.2 * f[2, 3], rtol=1e-10)


@pytest.mark.parametrize("symmetric", [False, True])
def test_converged_walk_gradients(symmetric):
    theta = jnp.asarray([-0.5, -1.0, -0.2, -0.7])
    feats, f = _features(), _scores()
    g = _scores(seed=7)
    alpha = 0.6

    def weights_of(theta):
        return rwn.affinity(rwn.feature_distances(feats, OFFS), theta, OFFS)

    @jax.jit
    def loss(theta, f):
        y = rwn.random_walk(weights_of(theta), f, OFFS, alpha=alpha, symmetric=symmetric, tol=1e-13)
        return jnp.sum(g * y) + 0.5 * jnp.sum(y ** 2)

    def loss_dense(theta, f):
        y = _dense_limit(weights_of(theta), f, alpha)
        return jnp.sum(g * y) + 0.5 * jnp.sum(y ** 2)

    got = jax.grad(loss, argnums=(0, 1))(theta, f)
    want = jax.grad(loss_dense, argnums=(0, 1))(theta, f)
    for a, e in zip(got, want):
        np.testing.assert_allclose(a, e, rtol=1e-7, atol=1e-10)
    check_grads(loss, (theta, f), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)
    # and the stepped layer, through the scan
    step_loss = jax.jit(lambda w, f: jnp.sum(g * rwn.random_walk(w, f, OFFS, alpha=1.0, num_steps=2) ** 2))
    check_grads(step_loss, (_sym_weights(), f), order=1, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def test_jit_vmap_float32():
    ws = jnp.stack([_sym_weights(s, np.float32) for s in range(2)])
    fs = jnp.stack([_scores(s, np.float32) for s in range(2)])

    @jax.jit
    @jax.vmap
    def walk(w, f):
        return (rwn.random_walk(w, f, OFFS, alpha=0.9, symmetric=True, tol=1e-6),
                rwn.random_walk(w, f, OFFS, alpha=0.9, tol=1e-6),
                rwn.random_walk(w, f, OFFS, alpha=1.0, num_steps=1))

    ys, yn, y1 = walk(ws, fs)
    for y in (ys, yn, y1):
        assert y.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y)))
    for n in range(2):
        want = _dense_limit(_sym_weights(n), _scores(n), 0.9)
        np.testing.assert_allclose(ys[n], want, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(yn[n], want, rtol=1e-3, atol=1e-4)
    g = jax.jit(jax.vmap(jax.grad(lambda w, f: jnp.sum(rwn.random_walk(w, f, OFFS, alpha=0.9) ** 2))))(ws, fs)
    assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))


def test_affinity_loss_matches_loop():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, (H, W))
    labels[0, 0] = 255
    w = rng.uniform(0, 1, (H, W, len(OFFS)))
    got = rwn.affinity_loss(jnp.asarray(w), jnp.asarray(labels), OFFS)
    total, n = 0.0, 0
    for y in range(H):
        for x in range(W):
            for k, (dy, dx) in enumerate(OFFS):
                yy, xx = y + dy, x + dx
                if 0 <= yy < H and 0 <= xx < W and labels[y, x] != 255 and labels[yy, xx] != 255:
                    total += (w[y, x, k] - float(labels[y, x] == labels[yy, xx])) ** 2
                    n += 1
    np.testing.assert_allclose(got, total / n, rtol=1e-12)
    assert rwn.affinity_loss(jnp.asarray(w, jnp.float32), jnp.asarray(labels), OFFS).dtype == jnp.float32


def test_bad_arguments():
    w, f = _nonsym_weights(), _scores()
    with pytest.raises(ValueError, match="alpha: expected 0 <= alpha < 1"):
        rwn.random_walk(w, f, OFFS, alpha=1.0)
    with pytest.raises(ValueError, match="weights: symmetric=True promises"):
        rwn.random_walk(w, f, OFFS, alpha=0.5, symmetric=True)
    with pytest.raises(ValueError, match="weights: expected shape"):
        rwn.random_walk(w[..., :-1], f, OFFS, alpha=0.5)
    with pytest.raises(ValueError, match="nonnegative"):
        rwn.random_walk(-w, f, OFFS, alpha=0.5)
    with pytest.raises(TypeError, match="f: expected a floating"):
        rwn.random_walk(w, jnp.ones((H, W, C), jnp.int32), OFFS, alpha=0.5)
    with pytest.raises(ValueError, match="num_steps"):
        rwn.random_walk(w, f, OFFS, alpha=0.5, num_steps=-1)
    with pytest.raises(ValueError, match="theta: expected shape"):
        rwn.affinity(rwn.feature_distances(_features(), OFFS), jnp.ones(3))


# --------------------------------------------------------------------------- non-finite values (issue 9)


def test_nan_weight_converged_walk_is_nan_or_an_error_never_zero():
    """Issue 9.1 repro: one NaN weight made the converged walk return exactly zero."""
    offs = stencil.four_connected()
    w = jnp.ones((8, 8, 4)).at[3, 3, 0].set(jnp.nan)
    f = jnp.ones((8, 8, 2))
    for sym in (False, True):
        with pytest.raises(ValueError, match="weights: expected finite affinities, got 1 NaN/inf"):
            rwn.random_walk(w, f, offs, alpha=0.9, symmetric=sym)
        run = jax.jit(lambda w, f: rwn.random_walk(w, f, offs, alpha=0.9, symmetric=sym, return_info=True))
        y, info = run(w, f)
        assert bool(jnp.all(jnp.isnan(y))) and not bool(jnp.any(info.converged))
        # and in the scores
        y, info = run(jnp.ones((8, 8, 4)), f.at[0, 0, 1].set(jnp.inf))
        assert bool(jnp.all(jnp.isnan(y[..., 1]))) and not bool(info.converged[1]) and bool(info.converged[0])
    with pytest.raises(ValueError, match="f: expected finite scores"):
        rwn.random_walk(jnp.ones((8, 8, 4)), f.at[0, 0, 1].set(jnp.nan), offs, alpha=0.9)


@pytest.mark.parametrize("symmetric", [False, True])
def test_traced_alpha_out_of_range_gives_nan_and_checkify_error(symmetric):
    """Issue 9.2: alpha = 1.0 traced under jit returned zeros with converged=True."""
    from jax.experimental import checkify

    w, f = _sym_weights(), _scores()
    run = jax.jit(lambda a: rwn.random_walk(w, f, OFFS, alpha=a, symmetric=symmetric, return_info=True))
    for a in (1.0, 1.5, -0.1, jnp.nan):
        y, info = run(jnp.asarray(a))
        assert bool(jnp.all(jnp.isnan(y))) and not bool(jnp.any(info.converged)), a
    y, info = run(jnp.asarray(0.5))
    np.testing.assert_allclose(y, _dense_limit(w, f, 0.5), rtol=1e-5, atol=1e-6)
    assert bool(jnp.all(info.converged))
    checked = jax.jit(checkify.checkify(
        lambda a: rwn.random_walk(w, f, OFFS, alpha=a, symmetric=symmetric, checked=True)))
    err, _ = checked(jnp.asarray(1.0))
    with pytest.raises(checkify.JaxRuntimeError, match=r"alpha: expected 0 <= alpha < 1 .* got 1.0"):
        err.throw()
    err, y = checked(jnp.asarray(0.5))
    err.throw()  # no error for a valid alpha
    assert bool(jnp.all(jnp.isfinite(y)))


def test_symmetric_walk_with_many_channels_matches_dense():
    """C = 11 (> 8, padded inside the solve to 16): the result and the info have C entries."""
    w = _sym_weights()
    f = jnp.asarray(np.random.default_rng(5).normal(size=(H, W, 11)))
    y, info = rwn.random_walk(w, f, OFFS, alpha=0.9, symmetric=True, tol=1e-11, return_info=True)
    want = 0.1 * jnp.linalg.solve(jnp.eye(H * W) - 0.9 * _dense_A(w), f.reshape(H * W, 11)).reshape(f.shape)
    np.testing.assert_allclose(y, want, rtol=1e-8, atol=1e-10)
    assert info.residual.shape == (11,) and info.converged.shape == (11,) and bool(jnp.all(info.converged))


def test_float32_walk_reaches_the_documented_tolerance():
    """The docstring's claim: float32 CG reaches tol = 1e-5 at alpha = 0.9 (it stalls near that)."""
    w, f = _sym_weights(dtype=np.float32), _scores(dtype=np.float32)
    y, info = rwn.random_walk(w, f, OFFS, alpha=0.9, symmetric=True, tol=1e-5, return_info=True)
    assert bool(jnp.all(info.converged)) and y.dtype == jnp.float32
    want = _dense_limit(_sym_weights(), _scores(), 0.9)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_converged_walk_of_scores_at_the_bottom_of_the_normal_range(dtype):
    """Issue 29 (the limitation recorded in rwn.py): with small weights (degree < 1), scores
    near the smallest normal number underflowed in f * sqrt(d) and the walk returned zeros
    with ``converged=True``. It now solves for f / 2^e (exact) and returns the scaled walk."""
    tiny = np.finfo(dtype).tiny
    w = _sym_weights(dtype=dtype) * dtype(0.01)  # degrees well below 1
    f = jnp.asarray(np.random.default_rng(3).uniform(2, 4, (H, W, C)) * tiny, dtype)
    y, info = rwn.random_walk(w, f, OFFS, alpha=0.5, symmetric=True, tol=1e-5, return_info=True)
    big = 2.0 ** 100
    want = rwn.random_walk(w, f * dtype(big), OFFS, alpha=0.5, symmetric=True, tol=1e-5) / dtype(big)
    assert bool(jnp.all(info.converged)) and float(jnp.min(y)) > 0
    np.testing.assert_array_equal(y, want)  # powers of two scale exactly
    # and for ordinary scores the power-of-two scaling changes no bit (float32 convergence unchanged)
    w32, f32 = _sym_weights(dtype=np.float32), _scores(dtype=np.float32)
    y1 = rwn.random_walk(w32, f32, OFFS, alpha=0.9, symmetric=True, tol=1e-5)
    y2 = rwn.random_walk(w32, f32 * np.float32(2.0 ** -60), OFFS, alpha=0.9, symmetric=True, tol=1e-5)
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y1) * np.float32(2.0 ** -60))


def test_grouped_stencil_product_matches_dense_value_and_gradient():
    """K = 48 > 40 offsets: the converged walk's product (stencil.apply_masked) runs in two groups."""
    offs = stencil.disk_offsets(4)
    assert len(offs) > 40  # apply_masked's default group
    feats, f = _features(), _scores()
    g = _scores(seed=7)

    def weights_of(theta):
        return rwn.affinity(rwn.feature_distances(feats, offs), theta, offs)

    def dense(theta, f):
        m = stencil.to_dense(weights_of(theta), offs)
        a = m / jnp.sum(m, axis=1, keepdims=True)
        return 0.3 * jnp.linalg.solve(jnp.eye(H * W) - 0.7 * a, f.reshape(H * W, C)).reshape(f.shape)

    def walk(theta, f):
        return rwn.random_walk(weights_of(theta), f, offs, alpha=0.7, symmetric=True, tol=1e-13)

    theta = jnp.asarray([-0.5, -1.0, -0.2, -0.7])
    np.testing.assert_allclose(jax.jit(walk)(theta, f), dense(theta, f), rtol=1e-9, atol=1e-11)
    got = jax.jit(jax.grad(lambda t, f: jnp.sum(g * walk(t, f) ** 2), argnums=(0, 1)))(theta, f)
    want = jax.grad(lambda t, f: jnp.sum(g * dense(t, f) ** 2), argnums=(0, 1))(theta, f)
    for a, e in zip(got, want):
        np.testing.assert_allclose(a, e, rtol=1e-7, atol=1e-10)


def test_symmetric_walk_forward_mode_and_vmapped_gradient_match_dense():
    """The loop product's derivative rule (stencil.apply_masked -> stencil.apply) in jvp and vmap(grad)."""
    theta = jnp.asarray([-0.5, -1.0, -0.2, -0.7])
    dtheta = jnp.asarray([0.3, -0.2, 0.5, 0.1])
    feats, f, df = _features(), _scores(), _scores(seed=5)

    def weights_of(theta):
        return rwn.affinity(rwn.feature_distances(feats, OFFS), theta, OFFS)

    def walk(theta, f):
        return rwn.random_walk(weights_of(theta), f, OFFS, alpha=0.7, symmetric=True, tol=1e-13)

    def dense(theta, f):
        return _dense_limit(weights_of(theta), f, 0.7)

    y, dy = jax.jit(lambda t, f: jax.jvp(walk, (t, f), (dtheta, df)))(theta, f)
    y_want, dy_want = jax.jvp(dense, (theta, f), (dtheta, df))
    np.testing.assert_allclose(y, y_want, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dy, dy_want, rtol=1e-8, atol=1e-10)
    thetas = jnp.stack([theta, theta + 0.1])
    fs = jnp.stack([f, df])
    got = jax.jit(jax.vmap(jax.grad(lambda t, f: jnp.sum(walk(t, f) ** 2), argnums=(0, 1))))(thetas, fs)
    for n in range(2):
        want = jax.grad(lambda t, f: jnp.sum(dense(t, f) ** 2), argnums=(0, 1))(thetas[n], fs[n])
        for a, e in zip(got, want):
            np.testing.assert_allclose(a[n], e, rtol=1e-7, atol=1e-10)

