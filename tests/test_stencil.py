"""rwseg.stencil against independent numpy references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rwseg import stencil as S

def np_neighbor(x, i, j, dy, dx):
    h, w = x.shape[:2]
    if 0 <= i + dy < h and 0 <= j + dx < w:
        return x[i + dy, j + dx]
    return np.zeros(x.shape[2:], x.dtype)


def np_apply(weights, x, offsets):
    h, w, _ = x.shape
    y = np.zeros_like(x)
    for i, j in itertools.product(range(h), range(w)):
        for k, (dy, dx) in enumerate(offsets):
            y[i, j] += weights[i, j, k] * np_neighbor(x, i, j, dy, dx)
    return y


def np_dense(weights, offsets):
    h, w, _ = weights.shape
    m = np.zeros((h * w, h * w))
    for i, j in itertools.product(range(h), range(w)):
        for k, (dy, dx) in enumerate(offsets):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                m[i * w + j, (i + dy) * w + j + dx] += weights[i, j, k]
    return m


STENCILS = {
    "four": S.four_connected(),
    "disk2": S.disk_offsets(2),
    "dilated": S.dilated_offsets([1, (2, 3)]),
    "far": ((0, 9), (-7, 0), (2, -1)),  # offsets larger than the image in one axis
}


# --------------------------------------------------------------------------- offsets


def test_disk_offsets_by_enumeration():
    for r in range(0, 6):
        expected = sorted(
            (dy, dx) for dy in range(-10, 11) for dx in range(-10, 11) if 0 < dy * dy + dx * dx <= r * r
        )
        assert list(S.disk_offsets(r)) == expected
    assert S.disk_offsets(1) == tuple(sorted(S.four_connected()))
    assert len(S.disk_offsets(5)) == 80


def test_dilated_offsets_order():
    assert S.dilated_offsets([2]) == ((-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2), (2, -2), (2, 0), (2, 2))
    offs = S.dilated_offsets([8, (12, 24), 16])
    assert len(offs) == 24
    assert offs[8:16] == tuple((sy * 12, sx * 24) for sy in (-1, 0, 1) for sx in (-1, 0, 1) if (sy, sx) != (0, 0))


def test_four_connected():
    assert S.four_connected() == ((-1, 0), (0, -1), (0, 1), (1, 0))


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: S.disk_offsets(-1), ValueError, "radius"),
        (lambda: S.disk_offsets(1.5), TypeError, "radius"),
        (lambda: S.dilated_offsets([0]), ValueError, "rates"),
        (lambda: S.dilated_offsets([(3, -1)]), ValueError, "rates"),
        (lambda: S.dilated_offsets(4), TypeError, "rates"),
        (lambda: S.dilated_offsets([]), ValueError, "rates"),
        (lambda: S.as_offsets([(0, 0)]), ValueError, "(0, 0)"),
        (lambda: S.as_offsets([(1, 2, 3)]), ValueError, "offsets"),
        (lambda: S.as_offsets([]), ValueError, "offsets"),
    ],
)
def test_offset_errors(call, exc, words):
    with pytest.raises(exc, match=None) as info:
        call()
    assert words in str(info.value)


# --------------------------------------------------------------------------- operators


@pytest.mark.parametrize("name", list(STENCILS))
def test_gather_and_valid_mask(rng, name):
    offsets = STENCILS[name]
    x = rng.normal(size=(5, 7, 2))
    g = np.asarray(S.gather(jnp.asarray(x), offsets))
    valid = S.valid_mask(5, 7, offsets)
    assert g.shape == (5, 7, len(offsets), 2) and valid.shape == (5, 7, len(offsets))
    for i, j in itertools.product(range(5), range(7)):
        for k, (dy, dx) in enumerate(offsets):
            np.testing.assert_array_equal(g[i, j, k], np_neighbor(x, i, j, dy, dx))
            assert valid[i, j, k] == (0 <= i + dy < 5 and 0 <= j + dx < 7)


@pytest.mark.parametrize("name", list(STENCILS))
def test_apply_matches_numpy_loop_and_dense(rng, name):
    offsets = STENCILS[name]
    w = rng.normal(size=(5, 7, len(offsets)))
    x = rng.normal(size=(5, 7, 3))
    y = S.apply(jnp.asarray(w), jnp.asarray(x), offsets)
    np.testing.assert_allclose(y, np_apply(w, x, offsets), atol=1e-12)
    dense = np_dense(w, offsets)
    np.testing.assert_allclose(S.to_dense(jnp.asarray(w), offsets), dense, atol=1e-12)
    np.testing.assert_allclose(
        S.apply_transpose(jnp.asarray(w), jnp.asarray(x), offsets).reshape(35, 3), dense.T @ x.reshape(35, 3), atol=1e-12
    )


@pytest.mark.parametrize("name", list(STENCILS))
def test_adjoint_identity(rng, name):
    offsets = STENCILS[name]
    w, x, y = (jnp.asarray(rng.normal(size=s)) for s in [(6, 5, len(offsets)), (6, 5, 4), (6, 5, 4)])
    lhs = jnp.vdot(S.apply(w, x, offsets), y)
    rhs = jnp.vdot(x, S.apply_transpose(w, y, offsets))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)
    # apply_transpose is also what autodiff finds as the transpose of apply.
    (auto_t,) = jax.linear_transpose(lambda v: S.apply(w, v, offsets), x)(y)
    np.testing.assert_allclose(auto_t, S.apply_transpose(w, y, offsets), atol=1e-12)


def test_degree(rng):
    offsets = S.disk_offsets(2)
    w = rng.uniform(size=(4, 6, len(offsets)))
    np.testing.assert_allclose(S.degree(jnp.asarray(w), offsets), np_dense(w, offsets).sum(1).reshape(4, 6), atol=1e-12)


def test_gradients(rng):
    offsets = S.dilated_offsets([1, 2])
    w = jnp.asarray(rng.normal(size=(4, 5, len(offsets))))
    x = jnp.asarray(rng.normal(size=(4, 5, 2)))
    check_grads(lambda w, x: S.apply(w, x, offsets), (w, x), order=2, modes=("fwd", "rev"))
    check_grads(lambda w, x: S.apply_transpose(w, x, offsets), (w, x), order=2, modes=("fwd", "rev"))
    # Weights that point outside the image do not influence the result.
    g = jax.grad(lambda w: S.apply(w, x, offsets).sum())(w)
    assert np.all(np.asarray(g)[~S.valid_mask(4, 5, offsets)] == 0)


def test_jit_vmap_and_float32(rng):
    offsets = S.disk_offsets(1)
    w = jnp.asarray(rng.normal(size=(3, 4, 5, 4)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(3, 4, 5, 2)), jnp.float32)
    f = jax.jit(jax.vmap(lambda w, x: S.apply_transpose(w, S.apply(w, x, offsets), offsets)))
    y = f(w, x)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    for b in range(3):
        d = np_dense(np.asarray(w[b], np.float64), offsets)
        np.testing.assert_allclose(y[b].reshape(20, 2), d.T @ d @ np.asarray(x[b], np.float64).reshape(20, 2), rtol=1e-4, atol=1e-5)


def test_label_affinity(rng):
    labels = rng.integers(-1, 4, size=(6, 7))
    labels[2, 3] = 255
    offsets = S.dilated_offsets([1, 2])
    targets, valid = S.label_affinity(jnp.asarray(labels, jnp.int32), offsets)
    for i, j in itertools.product(range(6), range(7)):
        for k, (dy, dx) in enumerate(offsets):
            inside = 0 <= i + dy < 6 and 0 <= j + dx < 7
            a = labels[i, j]
            b = labels[i + dy, j + dx] if inside else -1
            ok = inside and a >= 0 and a != 255 and b >= 0 and b != 255
            assert bool(valid[i, j, k]) == ok
            assert float(targets[i, j, k]) == (1.0 if ok and a == b else 0.0)
    # vmap over a batch of label maps
    t2, v2 = jax.vmap(lambda l: S.label_affinity(l, offsets))(jnp.stack([jnp.asarray(labels)] * 2))
    np.testing.assert_array_equal(t2[1], targets)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: S.apply(jnp.ones((4, 5, 3)), jnp.ones((4, 5, 2)), S.four_connected()), ValueError, "weights"),
        (lambda: S.apply(jnp.ones((4, 5, 4)), jnp.ones((4, 5)), S.four_connected()), ValueError, "x"),
        (lambda: S.apply(jnp.ones((4, 6, 4)), jnp.ones((4, 5, 2)), S.four_connected()), ValueError, "(4, 5, 4)"),
        (lambda: S.apply(jnp.ones((4, 5, 4)), jnp.ones((4, 5, 2), jnp.int32), S.four_connected()), TypeError, "x"),
        (lambda: S.apply_transpose(jnp.ones((4, 5, 3)), jnp.ones((4, 5, 2)), S.four_connected()), ValueError, "K"),
        (lambda: S.label_affinity(jnp.ones((4, 5)), S.four_connected()), TypeError, "labels"),
        (lambda: S.label_affinity(jnp.ones((4, 5, 1), jnp.int32), S.four_connected()), ValueError, "(4, 5, 1)"),
        (lambda: S.to_dense(jnp.ones((4, 5, 2)), S.four_connected()), ValueError, "weights"),
    ],
)
def test_operator_errors(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    assert words in str(info.value)


# --------------------------------------------------------------------------- hand-written derivatives (issue 8)


def _dense_apply(w, x, offsets):
    """The oracle: the dense matrix times x, differentiated by plain autodiff."""
    h, wd, c = x.shape
    return (S.to_dense(w, offsets) @ x.reshape(h * wd, c)).reshape(x.shape)


def _dense_apply_transpose(w, x, offsets):
    h, wd, c = x.shape
    return (S.to_dense(w, offsets).T @ x.reshape(h * wd, c)).reshape(x.shape)


def _apply_masked_in_groups(w, x, offsets):
    """The solver-loop form: masked once, summed in groups of 2 offsets (several groups)."""
    return S.apply_masked(S.mask_weights(w, offsets), x, offsets, group=2)


OPS = {"apply": (S.apply, _dense_apply), "apply_transpose": (S.apply_transpose, _dense_apply_transpose),
       "apply_masked": (_apply_masked_in_groups, _dense_apply)}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("name", ["four", "dilated", "far"])
def test_vjp_and_jvp_match_the_dense_oracle(rng, op, name):
    offsets = STENCILS[name]
    fast, dense = (lambda w, x, f=f: f(w, x, offsets) for f in OPS[op])
    w, x, g, dw, dx = (jnp.asarray(rng.normal(size=s)) for s in [(4, 5, len(offsets)), (4, 5, 3), (4, 5, 3), (4, 5, len(offsets)), (4, 5, 3)])
    y, pullback = jax.vjp(fast, w, x)
    y_ref, pullback_ref = jax.vjp(dense, w, x)
    np.testing.assert_allclose(y, y_ref, atol=1e-12)
    for got, want in zip(pullback(g), pullback_ref(g)):
        np.testing.assert_allclose(got, want, atol=1e-12)
    _, tangent = jax.jvp(fast, (w, x), (dw, dx))
    _, tangent_ref = jax.jvp(dense, (w, x), (dw, dx))
    np.testing.assert_allclose(tangent, tangent_ref, atol=1e-12)
    # second order: Hessian-vector products of a non-linear loss through the operator
    loss = lambda f: (lambda w, x: jnp.sum(jnp.sin(f(w, x)) * g))
    hvp = lambda f: jax.jvp(jax.grad(loss(f), argnums=(0, 1)), (w, x), (dw, dx))[1]
    for got, want in zip(hvp(fast), hvp(dense)):
        np.testing.assert_allclose(got, want, atol=1e-11)
    check_grads(fast, (w, x), order=2, modes=("fwd", "rev"))
    # eps=1e-6: the default step (1e-4 in float64) leaves a finite-difference truncation
    # error of about 1e-5 relative on tanh's third derivative, at the tolerance itself
    check_grads(lambda w, x: jnp.tanh(fast(w, x)), (w, x), order=2, modes=("fwd", "rev"), eps=1e-6)


def test_weight_cotangent_is_the_gather_dot(rng):
    offsets = STENCILS["disk2"]
    w, x, g = (rng.normal(size=s) for s in [(5, 6, len(offsets)), (5, 6, 2), (5, 6, 2)])
    _, pullback = jax.vjp(lambda w: S.apply(w, jnp.asarray(x), offsets), jnp.asarray(w))
    (dw,) = pullback(jnp.asarray(g))
    want = np.zeros_like(w)
    for i, j in itertools.product(range(5), range(6)):
        for k, (dy, dx) in enumerate(offsets):
            want[i, j, k] = g[i, j] @ np_neighbor(x, i, j, dy, dx)  # zero for invalid entries
    np.testing.assert_allclose(dw, want, atol=1e-12)


@pytest.mark.parametrize("op", ["apply", "apply_transpose"])
def test_weight_gradient_of_sum_of_squares_under_jit(rng, op):
    """Issue 29: ``grad_w sum(op(w, x)**2)`` is the lowering whose operands are materialised
    (an always-taken cond) so that XLA cannot fuse the forward into the weight correlation:
    it still equals the dense oracle, also with a NaN at the first pixel (the cond's other,
    equally exact branch)."""
    offsets = STENCILS["disk2"]
    fast = lambda w, x: getattr(S, op)(w, x, offsets)
    w, x = (jnp.asarray(rng.normal(size=s)) for s in [(5, 6, len(offsets)), (5, 6, 2)])

    def oracle(w, x):
        m = S.to_dense(w, offsets)
        m = m if op == "apply" else m.T
        return jnp.sum((m @ x.reshape(30, 2)) ** 2)

    got = jax.jit(jax.grad(lambda w, x: jnp.sum(fast(w, x) ** 2)))(w, x)
    np.testing.assert_allclose(got, jax.grad(oracle)(w, x), atol=1e-11)
    x_nan = x.at[0, 0, 0].set(jnp.nan)
    a, b = S._materialized(x_nan, w)
    np.testing.assert_array_equal(a, x_nan)
    np.testing.assert_array_equal(b, w)
    got = jax.jit(jax.grad(lambda w, x: jnp.sum(fast(w, x) ** 2)))(w, x_nan)
    assert bool(jnp.isnan(got).any()) and bool(jnp.isfinite(got).any())  # NaN where x[0, 0] enters, not all


def test_vmap_of_the_vjp_and_jit_of_grad(rng):
    offsets = S.dilated_offsets([1, 2])
    b = 3
    w = jnp.asarray(rng.normal(size=(b, 4, 5, len(offsets))))
    x, g = (jnp.asarray(rng.normal(size=(b, 4, 5, 2))) for _ in range(2))

    def vjp(w, x, g):
        y, pullback = jax.vjp(lambda w, x: S.apply(w, x, offsets), w, x)
        return (y,) + pullback(g)

    def vjp_ref(w, x, g):
        y, pullback = jax.vjp(lambda w, x: _dense_apply(w, x, offsets), w, x)
        return (y,) + pullback(g)

    # every batching pattern: all batched, shared weights (folded into channels), shared x,
    # and a batch axis that is not the leading one
    cases = [
        ((0, 0, 0), (w, x, g)),
        ((None, 0, 0), (w[0], x, g)),
        ((0, None, 0), (w, x[0], g)),
        ((0, 2, 0), (w, jnp.moveaxis(x, 0, 2), g)),
    ]
    for axes, args in cases:
        got = jax.jit(jax.vmap(vjp, in_axes=axes))(*args)
        for n in range(b):
            per = [a if ax is None else jnp.take(a, n, axis=ax) for a, ax in zip(args, axes)]
            for got_part, want_part in zip(got, vjp_ref(*per)):
                np.testing.assert_allclose(got_part[n], want_part, atol=1e-12)
    # nested vmap and jit(grad)
    nested = jax.vmap(jax.vmap(lambda w, x: S.apply_transpose(w, x, offsets), in_axes=(None, 0)), in_axes=(0, 0))
    xx = jnp.stack([x, 2 * x], axis=1)  # (b, 2, H, W, C)
    got = nested(w, xx)
    for n, m in itertools.product(range(b), range(2)):
        np.testing.assert_allclose(got[n, m], _dense_apply_transpose(w[n], xx[n, m], offsets), atol=1e-12)
    loss = lambda w, x: jnp.sum(S.apply(w, x, offsets) ** 2)
    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(w[0], x[0])
    want = jax.grad(lambda w, x: jnp.sum(_dense_apply(w, x, offsets) ** 2), argnums=(0, 1))(w[0], x[0])
    for a, c in zip(got, want):
        np.testing.assert_allclose(a, c, atol=1e-12)


def test_mixed_dtypes_keep_cotangent_dtypes(rng):
    offsets = S.four_connected()
    w = jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(3, 4, 2)), jnp.float64)
    y, pullback = jax.vjp(lambda w, x: S.apply(w, x, offsets), w, x)
    dw, dx = pullback(jnp.ones_like(y))
    assert y.dtype == jnp.float64 and dw.dtype == jnp.float32 and dx.dtype == jnp.float64


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_out_of_image_weights_are_ignored_exactly(rng, bad):
    """Issue 9: a non-finite weight on an entry pointing outside the image changes nothing."""
    offsets = STENCILS["dilated"]
    valid = S.valid_mask(5, 6, offsets)
    w = rng.normal(size=(5, 6, len(offsets)))
    x = jnp.asarray(rng.normal(size=(5, 6, 2)))
    w_bad = jnp.asarray(np.where(valid, w, bad))
    w_zero = jnp.asarray(np.where(valid, w, 0.0))
    for op in (S.apply, S.apply_transpose):
        np.testing.assert_array_equal(op(w_bad, x, offsets), op(w_zero, x, offsets))
        gx = jax.grad(lambda x: jnp.sum(op(w_bad, x, offsets)))(x)
        np.testing.assert_array_equal(gx, jax.grad(lambda x: jnp.sum(op(w_zero, x, offsets)))(x))
        gw = jax.grad(lambda w: jnp.sum(op(w, x, offsets)))(w_bad)
        assert np.all(np.isfinite(gw)) and np.all(np.asarray(gw)[~valid] == 0)
    # an invalid entry inside the image is still used: NaN there does reach the output
    w_nan_inside = jnp.asarray(np.where(valid, w, 0.0)).at[2, 2, 0].set(np.nan)
    assert np.isnan(np.asarray(S.apply(w_nan_inside, x, offsets))[2, 2]).all()


def test_grad_inside_shard_map(rng):
    """The primitive keeps shard_map's varying-axes types (check_vma), so grad works inside it."""
    from jax.sharding import PartitionSpec as P

    offsets = S.four_connected()
    mesh = jax.make_mesh((1,), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    w = jnp.asarray(rng.normal(size=(2, 3, 4, 4)))
    x = jnp.asarray(rng.normal(size=(2, 3, 4, 2)))
    shared = jnp.asarray(rng.normal(size=(3, 4, 4)))

    def loss(w, x):
        per = jax.vmap(lambda w, x: S.apply(w, x, offsets) + S.apply_transpose(shared, x, offsets))
        return jnp.sum(jax.shard_map(per, mesh=mesh, in_specs=(P("b"), P("b")), out_specs=P("b"))(w, x) ** 2)

    def loss_ref(w, x):
        per = jax.vmap(lambda w, x: _dense_apply(w, x, offsets) + _dense_apply_transpose(shared, x, offsets))
        return jnp.sum(per(w, x) ** 2)

    for got, want in zip(jax.jit(jax.grad(loss, argnums=(0, 1)))(w, x), jax.grad(loss_ref, argnums=(0, 1))(w, x)):
        np.testing.assert_allclose(got, want, atol=1e-11)


def test_asymmetry_matches_the_dense_matrix():
    """defect = max |M - M^T| of to_dense; NaN inside the image shows, outside is ignored."""
    offsets = S.disk_offsets(2)
    h, w = 5, 6
    rng = np.random.default_rng(3)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, (h, w, len(offsets))))
    m = np.asarray(S.to_dense(weights, offsets))
    defect, scale = S.asymmetry(weights, offsets)
    np.testing.assert_allclose(float(defect), np.max(np.abs(m - m.T)), rtol=1e-12)
    np.testing.assert_allclose(float(scale), np.max(np.abs(m)), rtol=1e-12)
    sym = jnp.asarray((m + m.T) / 2)  # back to stencil weights: W[i, k] = M[i, i + o_k]
    valid = S.valid_mask(h, w, offsets)
    ys, xs, ks = np.nonzero(valid)
    cols = (ys + np.array(offsets)[ks, 0]) * w + xs + np.array(offsets)[ks, 1]
    sym_w = jnp.zeros_like(weights).at[ys, xs, ks].set(sym[ys * w + xs, cols])
    assert float(S.asymmetry(sym_w, offsets)[0]) == 0.0
    outside = tuple(np.argwhere(~valid)[0])
    assert float(S.asymmetry(sym_w.at[outside].set(jnp.nan), offsets)[0]) == 0.0
    inside = tuple(np.argwhere(valid)[0])
    assert np.isnan(float(S.asymmetry(sym_w.at[inside].set(jnp.nan), offsets)[0]))
    with pytest.raises(ValueError, match="missing the negation"):
        S.asymmetry(weights[..., :3], offsets[:3])


def test_apply_masked_requires_masked_weights_and_checks_its_arguments(rng):
    """Unmasked out-of-image weights are NOT ignored by apply_masked (documented), mask_weights fixes that."""
    offsets = STENCILS["disk2"]
    w, x = jnp.asarray(rng.normal(size=(4, 5, len(offsets)))), jnp.asarray(rng.normal(size=(4, 5, 3)))
    bad = jnp.where(jnp.asarray(S.valid_mask(4, 5, offsets)), w, jnp.nan)
    assert bool(jnp.isnan(S.apply_masked(bad, x, offsets)).any())
    np.testing.assert_allclose(S.apply_masked(S.mask_weights(bad, offsets), x, offsets), np_apply(np.asarray(w), np.asarray(x), offsets), atol=1e-12)
    with pytest.raises(ValueError, match="group"):
        S.apply_masked(w, x, offsets, group=0)
    with pytest.raises(ValueError, match="weights"):
        S.apply_masked(w[..., :3], x, offsets)
