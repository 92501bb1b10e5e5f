"""rwseg.linsolve against dense numpy solves on small stencil operators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rwseg import linsolve, stencil

H, W, C = 6, 7, 3
OFFS = stencil.disk_offsets(1)


def _weights(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(0.1, 1.0, (H, W, len(OFFS))), dtype)


def _spd_parts(w):
    """A x = d * x - (W + W^T) x with d = row sums + 0.5: SPD (diagonally dominant)."""
    ones = jnp.ones((H, W, 1), w.dtype)
    d = stencil.apply(w, ones, OFFS) + stencil.apply_transpose(w, ones, OFFS) + 0.5
    return d


def spd_matvec(w):
    d = _spd_parts(w)
    return lambda x: d * x - stencil.apply(w, x, OFFS) - stencil.apply_transpose(w, x, OFFS)


def spd_dense(w):
    m = stencil.to_dense(w, OFFS)
    s = m + m.T
    return jnp.diag(jnp.sum(s, 1) + 0.5) - s


def nonsym_matvec(w):
    d = stencil.degree(w, OFFS)[..., None] + 0.5
    return lambda x: d * x - stencil.apply(w, x, OFFS)


def nonsym_dense(w):
    m = stencil.to_dense(w, OFFS)
    return jnp.diag(jnp.sum(m, 1) + 0.5) - m


def _rhs(seed=1, dtype=np.float64):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(H, W, C)), dtype)


def _dense_solve(a, b):
    return np.linalg.solve(np.asarray(a), np.asarray(b).reshape(H * W, -1)).reshape(b.shape)


@pytest.mark.parametrize("solver,mv,dense", [
    (linsolve.cg, spd_matvec, spd_dense),
    (linsolve.bicgstab, nonsym_matvec, nonsym_dense),
    (linsolve.bicgstab, spd_matvec, spd_dense),
])
def test_solution_matches_dense(solver, mv, dense):
    w, b = _weights(), _rhs()
    x, info = solver(mv(w), b, tol=1e-10)
    np.testing.assert_allclose(x, _dense_solve(dense(w), b), rtol=1e-8, atol=1e-9)
    assert info.residual.shape == (C,) and info.converged.shape == (C,)
    assert bool(jnp.all(info.converged)) and float(jnp.max(info.residual)) <= 1e-10
    assert info.iterations.dtype == jnp.int32 and 0 < int(info.iterations) < 1000


def test_channels_are_independent_right_hand_sides():
    """Channels of very different scale (and a zero channel) converge on their own terms."""
    w = _weights()
    b = _rhs()
    b = b * jnp.array([1e-6, 1.0, 0.0]) + jnp.array([0.0, 0.0, 0.0])
    x, info = linsolve.cg(spd_matvec(w), b, tol=1e-9)
    want = _dense_solve(spd_dense(w), b)
    np.testing.assert_allclose(x[..., 0], want[..., 0], rtol=1e-7, atol=1e-16)
    np.testing.assert_allclose(x[..., 1], want[..., 1], rtol=1e-7, atol=1e-10)
    assert np.all(np.asarray(x[..., 2]) == 0)
    assert bool(jnp.all(info.converged))
    # each channel alone gives the same answer as in the batch
    x1, _ = linsolve.cg(spd_matvec(w), b[..., 1:2], tol=1e-9)
    np.testing.assert_allclose(x1[..., 0], x[..., 1], rtol=1e-8)


def test_single_vector_rhs_gives_scalar_info():
    w = _weights()
    a = spd_dense(w)
    mv = lambda v: a @ v  # noqa: E731
    b = _rhs()[..., 0].reshape(-1)
    x, info = linsolve.cg(mv, b, tol=1e-10)
    np.testing.assert_allclose(x, np.linalg.solve(np.asarray(a), np.asarray(b)), rtol=1e-8)
    assert info.residual.shape == () and info.converged.shape == ()


def test_not_converged_is_reported():
    w, b = _weights(), _rhs()
    for solver, mv in ((linsolve.cg, spd_matvec), (linsolve.bicgstab, nonsym_matvec)):
        x, info = solver(mv(w), b, tol=1e-12, max_iters=2)
        assert int(info.iterations) == 2
        assert not bool(jnp.any(info.converged))
        r = np.asarray(b - mv(w)(x)).reshape(-1, C)
        np.testing.assert_allclose(info.residual, np.linalg.norm(r, axis=0) / np.linalg.norm(
            np.asarray(b).reshape(-1, C), axis=0), rtol=1e-10)


def test_atol_and_warm_start():
    w, b = _weights(), _rhs()
    exact = _dense_solve(spd_dense(w), b)
    x, info = linsolve.cg(spd_matvec(w), b, tol=1e-10, x0=exact)
    assert int(info.iterations) == 0 and bool(jnp.all(info.converged))
    _, info_cold = linsolve.cg(spd_matvec(w), b, tol=0.0, atol=1e-3)
    _, info_tight = linsolve.cg(spd_matvec(w), b, tol=0.0, atol=1e-9)
    assert bool(jnp.all(info_cold.converged)) and int(info_cold.iterations) < int(info_tight.iterations)
    # a warm start does not break gradients (tangent/adjoint solves start from a projection)
    g = jax.grad(lambda b: jnp.sum(linsolve.cg(spd_matvec(w), b, tol=1e-12, x0=exact)[0] ** 2))(b)
    g_ref = 2 * _dense_solve(spd_dense(w), exact)
    np.testing.assert_allclose(g, g_ref, rtol=1e-7)


def test_jacobi_preconditioner_on_badly_scaled_system():
    w = _weights()
    scale = jnp.exp(jnp.asarray(np.random.default_rng(3).uniform(0, 12, (H, W, 1))))
    d = _spd_parts(w) * scale
    mv = lambda x: d * x - stencil.apply(w, x, OFFS) - stencil.apply_transpose(w, x, OFFS)  # noqa: E731
    m = stencil.to_dense(w, OFFS)
    a = jnp.diag(d.reshape(-1)) - m - m.T
    b = _rhs()
    x_p, info_p = linsolve.cg(mv, b, tol=1e-10, preconditioner=linsolve.jacobi(d))
    _, info_n = linsolve.cg(mv, b, tol=1e-10, max_iters=5000)
    np.testing.assert_allclose(x_p, _dense_solve(a, b), rtol=1e-7, atol=1e-12)
    assert int(info_p.iterations) < int(info_n.iterations)
    x_b, info_b = linsolve.bicgstab(mv, b, tol=1e-10, preconditioner=linsolve.jacobi(d))
    assert bool(jnp.all(info_b.converged))
    np.testing.assert_allclose(x_b, _dense_solve(a, b), rtol=1e-7, atol=1e-12)


def _loss_dense(dense, w, b, g):
    x = jnp.linalg.solve(dense(w), b.reshape(H * W, C)).reshape(H, W, C)
    return jnp.sum(g * x) + 0.5 * jnp.sum(x ** 2)


@pytest.mark.parametrize("name", ["cg", "bicgstab", "bicgstab_T"])
def test_gradients_match_dense_and_check_grads(name):
    if name == "cg":
        mv, dense = spd_matvec, spd_dense
        solve = lambda w, b: linsolve.cg(mv(w), b, tol=1e-13)[0]  # noqa: E731
    else:
        mv, dense = nonsym_matvec, nonsym_dense

        def solve(w, b):
            tm = None
            if name == "bicgstab_T":
                d = stencil.degree(w, OFFS)[..., None] + 0.5
                tm = lambda x: d * x - stencil.apply_transpose(w, x, OFFS)  # noqa: E731
            return linsolve.bicgstab(mv(w), b, tol=1e-13, transpose_matvec=tm)[0]

    w, b = _weights(), _rhs()
    g = _rhs(seed=5)

    def loss(w, b):
        x = solve(w, b)
        return jnp.sum(g * x) + 0.5 * jnp.sum(x ** 2)

    loss = jax.jit(loss)
    got = jax.grad(loss, argnums=(0, 1))(w, b)
    want = jax.grad(lambda w, b: _loss_dense(dense, w, b, g), argnums=(0, 1))(w, b)
    for a, e in zip(got, want):
        np.testing.assert_allclose(a, e, rtol=1e-7, atol=1e-10)
    check_grads(loss, (w, b), order=1, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def test_backward_is_a_solve_not_an_unrolled_loop():
    """Reverse mode through a while_loop is impossible in JAX; the grad jaxpr holds solves."""
    w, b = _weights(), _rhs()
    jaxpr = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(linsolve.cg(spd_matvec(w), b)[0])))(w)
    text = str(jaxpr)
    assert text.count("custom_linear_solve") >= 2  # forward + transposed solve


def test_implicit_solve_wraps_a_while_loop_solver():
    """Jacobi iteration (a while_loop, not differentiable) gets exact implicit gradients."""
    w, b = _weights(), _rhs()

    def jacobi_iteration(mv, rhs):
        # A = D - N with D = d; x <- (rhs + N x) / d; converges (diagonally dominant)
        d = _spd_parts(w)

        def body(s):
            x, k = s
            return x + (rhs - mv(x)) / d, k + 1

        def cond(s):
            x, k = s
            return (k < 2000) & (jnp.max(jnp.abs(rhs - mv(x))) > 1e-13)

        x, k = jax.lax.while_loop(cond, body, (jnp.zeros_like(rhs), 0))
        return x, k

    def loss(w, b):
        x, _ = linsolve.implicit_solve(spd_matvec(w), b, jacobi_iteration, symmetric=True)
        return jnp.sum(x ** 2)

    got = jax.grad(loss, argnums=(0, 1))(w, b)
    want = jax.grad(lambda w, b: jnp.sum(jnp.linalg.solve(spd_dense(w), b.reshape(H * W, C)) ** 2),
                    argnums=(0, 1))(w, b)
    for a, e in zip(got, want):
        np.testing.assert_allclose(a, e, rtol=1e-7, atol=1e-10)
    with pytest.raises(ValueError, match="transpose_solve"):
        linsolve.implicit_solve(nonsym_matvec(w), b, jacobi_iteration)


def test_float32_jit_vmap():
    ws = jnp.stack([_weights(s, np.float32) for s in range(3)])
    bs = jnp.stack([_rhs(s, np.float32) for s in range(3)])

    @jax.jit
    @jax.vmap
    def f(w, b):
        x1, i1 = linsolve.cg(spd_matvec(w), b, tol=1e-5)
        x2, i2 = linsolve.bicgstab(nonsym_matvec(w), b, tol=1e-5)
        return x1, x2, i1, i2

    x1, x2, i1, i2 = f(ws, bs)
    assert x1.dtype == jnp.float32 and x2.dtype == jnp.float32 and i1.residual.dtype == jnp.float32
    for n in range(3):
        w64, b64 = _weights(n), _rhs(n)
        np.testing.assert_allclose(x1[n], _dense_solve(spd_dense(w64), b64), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(x2[n], _dense_solve(nonsym_dense(w64), b64), rtol=1e-4, atol=1e-4)
    assert bool(jnp.all(i1.converged)) and bool(jnp.all(i2.converged))
    g = jax.jit(jax.vmap(jax.grad(lambda w, b: jnp.sum(linsolve.cg(spd_matvec(w), b)[0]))))(ws, bs)
    assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))


def test_bad_arguments():
    w = _weights()
    with pytest.raises(TypeError, match="b: expected a floating-point"):
        linsolve.cg(spd_matvec(w), jnp.ones((H, W, C), jnp.int32))
    with pytest.raises(ValueError, match="max_iters"):
        linsolve.cg(spd_matvec(w), _rhs(), max_iters=0)
    with pytest.raises(ValueError, match="tol"):
        linsolve.bicgstab(spd_matvec(w), _rhs(), tol=-1.0)
    with pytest.raises(TypeError, match="diagonal"):
        linsolve.jacobi(jnp.ones((H, W, 1), jnp.int32))


# --------------------------------------------------------------------------- non-finite values (issue 9)


@pytest.mark.parametrize("solver,mv", [(linsolve.cg, spd_matvec), (linsolve.bicgstab, nonsym_matvec)])
def test_nonfinite_rhs_gives_nan_for_that_channel_only(solver, mv):
    w, b = _weights(), _rhs()
    bad = b.at[2, 3, 1].set(jnp.nan).at[0, 0, 2].set(jnp.inf)
    for run in (solver, jax.jit(solver, static_argnums=0)):
        x, info = run(mv(w), bad)
        assert bool(jnp.all(jnp.isnan(x[..., 1]))) and bool(jnp.all(jnp.isnan(x[..., 2])))
        assert not bool(info.converged[1]) and not bool(info.converged[2]) and bool(info.converged[0])
        good, _ = solver(mv(w), b[..., :1])  # the finite channel is unaffected
        np.testing.assert_allclose(x[..., :1], good, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver,mv", [(linsolve.cg, spd_matvec), (linsolve.bicgstab, nonsym_matvec)])
@pytest.mark.parametrize("zero_rhs", [False, True])
def test_nan_operator_gives_nan_never_zero(solver, mv, zero_rhs):
    """matvec(0) = NaN used to fail the residual test silently and return the zero start."""
    w = _weights().at[3, 3, 0].set(jnp.nan)
    b = jnp.zeros((H, W, C)) if zero_rhs else _rhs()

    @jax.jit
    def run(w, b):
        return solver(mv(w), b)

    x, info = run(w, b)
    assert bool(jnp.all(jnp.isnan(x))) and not bool(jnp.any(info.converged))
    # a warm start that is already the answer does not hide it either
    x, info = solver(mv(w), b, x0=jnp.ones_like(b))
    assert bool(jnp.all(jnp.isnan(x))) and not bool(jnp.any(info.converged))


def test_argument_shape_checks_name_the_argument():
    w, b = _weights(), _rhs()
    with pytest.raises(ValueError, match=r"x0: expected a warm start shaped like b \(6, 7, 3\), got shape \(6, 7, 2\)"):
        linsolve.cg(spd_matvec(w), b, x0=jnp.zeros((H, W, 2)))
    with pytest.raises(ValueError, match=r"x0: expected .* got shape \(6, 7\)"):
        linsolve.bicgstab(nonsym_matvec(w), b, x0=jnp.zeros((H, W)))
    with pytest.raises(ValueError, match=r"preconditioner: expected .* shaped like b \(6, 7, 3\), got shape \(6, 7, 1\)"):
        linsolve.cg(spd_matvec(w), b, preconditioner=lambda v: v[..., :1])
    with pytest.raises(ValueError, match=r"preconditioner: expected"):
        linsolve.bicgstab(nonsym_matvec(w), b, preconditioner=lambda v: jnp.sum(v, -1))
    with pytest.raises(ValueError, match=r"matvec: expected .* got shape \(6, 7, 1\)"):
        linsolve.cg(lambda v: v[..., :1], b)
    with pytest.raises(TypeError, match=r"preconditioner: expected a callable"):
        linsolve.cg(spd_matvec(w), b, preconditioner=jnp.ones((H, W, C)))


@pytest.mark.parametrize("solver", ["cg", "bicgstab"])
def test_jacobi_diagonal_of_the_wrong_shape_names_the_preconditioner(solver):
    """A diagonal that does not broadcast against b used to fail inside jax's ``mul`` (issue 29)."""
    w, b = _weights(), _rhs()
    mv = spd_matvec(w) if solver == "cg" else nonsym_matvec(w)
    solve = getattr(linsolve, solver)
    with pytest.raises(ValueError, match=r"preconditioner: expected a map of arrays shaped like b \(6, 7, 3\)"):
        solve(mv, b, preconditioner=linsolve.jacobi(jnp.ones((H - 1, W, C))))
    # a diagonal that broadcasts to a larger array is caught by the shape check
    with pytest.raises(ValueError, match=r"preconditioner: expected .* shaped like b \(6, 7, 3\), got shape \(2, 6, 7, 3\)"):
        solve(mv, b, preconditioner=linsolve.jacobi(jnp.ones((2, H, W, C))))
    # the matvec gets the same treatment
    with pytest.raises(ValueError, match=r"matvec: expected a map of arrays shaped like b"):
        solve(lambda v: v * jnp.ones((H, W + 1, C)), b)
    # (H, W, 1) broadcasts over the channels: accepted
    x, info = solve(mv, b, preconditioner=linsolve.jacobi(jnp.ones((H, W, 1))))
    assert x.shape == b.shape


def test_numpy_scalar_tolerances_are_accepted():
    w, b = _weights(), _rhs()
    x, info = linsolve.cg(spd_matvec(w), b, tol=np.float32(1e-9), atol=np.float64(0.0), max_iters=np.int64(500))
    np.testing.assert_allclose(x, _dense_solve(spd_dense(w), b), rtol=1e-7, atol=1e-8)
    x, _ = linsolve.bicgstab(nonsym_matvec(w), b, tol=np.float32(1e-9))
    np.testing.assert_allclose(x, _dense_solve(nonsym_dense(w), b), rtol=1e-7, atol=1e-8)
    for bad in (np.nan, -1e-3, np.ones(2)):
        with pytest.raises(ValueError, match=r"tol: expected a finite float >= 0"):
            linsolve.cg(spd_matvec(w), b, tol=bad)


@pytest.mark.parametrize("solver,mv,dense", [
    (linsolve.cg, spd_matvec, spd_dense),
    (linsolve.bicgstab, nonsym_matvec, nonsym_dense),
])
@pytest.mark.parametrize("dtype,scale", [
    (np.float64, 1e-200), (np.float64, 1e200), (np.float32, 1e-25), (np.float32, 1e25),
])
def test_tiny_and_huge_right_hand_sides_are_solved(solver, mv, dense, dtype, scale):
    """Squared norms used to underflow (x = 0, converged) or overflow (NaN) far from 1.

    Found by the hypothesis 'dev' profile: rwn.random_walk of a 1e-200 score map gave 0.
    """
    w, b = _weights(dtype=dtype), _rhs(dtype=dtype)
    b = b.at[..., 0].multiply(scale)  # one extreme channel beside normal ones
    x, info = solver(mv(w), b, tol=1e-5 if dtype == np.float32 else 1e-10)
    expected = _dense_solve(dense(_weights()), np.asarray(b, np.float64))
    assert bool(jnp.all(info.converged)), info
    rtol = 1e-4 if dtype == np.float32 else 1e-8
    for c in range(C):
        ref = expected[..., c]
        np.testing.assert_allclose(np.asarray(x[..., c], np.float64) / np.abs(ref).max(), ref / np.abs(ref).max(),
                                   rtol=0, atol=rtol)
