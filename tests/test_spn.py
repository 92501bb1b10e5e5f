"""Tests of rwseg.spn against a plain numpy loop and the paper's properties (seed 002)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rwseg import spn
from rwseg.spn import DIRECTIONS


def _numpy_propagate(x, p, direction):
    """The recurrence written out in image coordinates, pixel by pixel (no flips)."""
    h_size, w_size, c_size = x.shape
    ds = (0,) if p.shape[-1] == 1 else (-1, 0, 1)
    h = np.zeros_like(x)
    if direction in ("left_to_right", "right_to_left"):
        step = -1 if direction == "left_to_right" else 1
        order = range(w_size) if step == -1 else range(w_size - 1, -1, -1)
        cells = [((i, t), [(i + d, t + step) for d in ds]) for t in order for i in range(h_size)]
    else:
        step = -1 if direction == "top_to_bottom" else 1
        order = range(h_size) if step == -1 else range(h_size - 1, -1, -1)
        cells = [((t, j), [(t + step, j + d) for d in ds]) for t in order for j in range(w_size)]
    for (y0, x0), nbrs in cells:
        for c in range(c_size):
            keep, acc = 1.0, 0.0
            for k, (yn, xn) in enumerate(nbrs):
                if 0 <= yn < h_size and 0 <= xn < w_size:
                    keep -= p[y0, x0, c, k]
                    acc += p[y0, x0, c, k] * h[yn, xn, c]
            h[y0, x0, c] = keep * x[y0, x0, c] + acc
    return h


def _inputs(seed, shape=(6, 7, 2), g=3, scale=0.4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    gates = rng.normal(scale=scale, size=shape + (g,))
    return x, gates


@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_propagate_matches_numpy_loop(direction, g):
    x, gates = _inputs(1, g=g)
    got = spn.propagate(jnp.asarray(x), jnp.asarray(gates), direction=direction)
    np.testing.assert_allclose(np.asarray(got), _numpy_propagate(x, gates, direction), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_first_line_is_copied(direction):
    x, gates = _inputs(2)
    h = np.asarray(spn.propagate(x, gates, direction=direction))
    first = {"left_to_right": np.s_[:, 0], "right_to_left": np.s_[:, -1],
             "top_to_bottom": np.s_[0], "bottom_to_top": np.s_[-1]}[direction]
    np.testing.assert_allclose(h[first], x[first], rtol=0, atol=0)


@pytest.mark.parametrize("g", [1, 3])
def test_constant_map_is_fixed_point(g):
    """Theorem 1: weights of every output sum to 1, for any (even unstable) gates."""
    _, gates = _inputs(3, g=g, scale=2.0)
    x = np.full(gates.shape[:3], 3.25)
    for d in DIRECTIONS:
        np.testing.assert_allclose(np.asarray(spn.propagate(x, gates, direction=d)), x, rtol=1e-9)
    four = np.stack([_inputs(s, g=g, scale=2.0)[1] for s in range(4)])
    np.testing.assert_allclose(np.asarray(spn.spn(x, four)), x, rtol=1e-9)


@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_propagation_matrix(direction, g):
    x, gates = _inputs(4, shape=(5, 6, 2), g=g)
    m = np.asarray(spn.propagation_matrix(gates, direction=direction, channel=1))
    np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-10)
    h = np.asarray(spn.propagate(x, gates, direction=direction))
    np.testing.assert_allclose(m @ x[:, :, 1].reshape(-1), h[:, :, 1].reshape(-1), rtol=1e-10, atol=1e-10)


def test_propagation_matrix_is_the_jacobian():
    x, gates = _inputs(5, shape=(4, 5, 1))
    jac = jax.jacfwd(lambda v: spn.propagate(v, gates, direction="bottom_to_top"))(jnp.asarray(x))
    np.testing.assert_allclose(
        np.asarray(jac).reshape(20, 20), np.asarray(spn.propagation_matrix(gates, direction="bottom_to_top")), atol=1e-12
    )


@pytest.mark.parametrize("shape", [(6, 6, 2), (5, 7, 3)])
@pytest.mark.parametrize("g", [1, 3])
def test_spn_is_max_of_four(shape, g):
    rng = np.random.default_rng(6)
    x = rng.normal(size=shape)
    gates = rng.normal(scale=0.4, size=(4,) + shape + (g,))
    runs = [np.asarray(spn.propagate(x, gates[i], direction=d)) for i, d in enumerate(DIRECTIONS)]
    np.testing.assert_allclose(np.asarray(spn.spn(x, gates)), np.max(runs, axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(spn.spn(x, gates, merge="mean")), np.mean(runs, axis=0), rtol=1e-12)


def test_check_grads():
    x, gates = _inputs(7, shape=(4, 5, 2))
    prop = jax.jit(spn.propagate, static_argnames="direction")
    check_grads(lambda a, b: prop(a, b, direction="bottom_to_top"), (x, gates), order=2, modes=("rev",))
    check_grads(lambda a, b: prop(a, b, direction="left_to_right"), (x, gates), order=1, modes=("fwd", "rev"))
    rng = np.random.default_rng(8)
    four = rng.normal(scale=0.3, size=(4, 4, 5, 2, 3))
    check_grads(jax.jit(spn.spn), (x, four), order=1, modes=("rev",))
    check_grads(spn.stabilize, (rng.normal(scale=2.0, size=(3, 4, 3)),), order=1, modes=("rev",))


def test_stabilize():
    rng = np.random.default_rng(9)
    small = rng.uniform(-1, 1, size=(5, 4, 2, 3)) / 3.0 * 0.99  # sum |p| < 1 already
    np.testing.assert_array_equal(np.asarray(spn.stabilize(small)), small)
    big = rng.normal(scale=3.0, size=(5, 4, 2, 3))
    out = np.asarray(spn.stabilize(big))
    total = np.abs(out).sum(-1)
    assert np.all(total <= 1 + 1e-12)
    over = np.abs(big).sum(-1) > 1
    np.testing.assert_allclose(total[over], 1.0, rtol=1e-12)
    # direction of each gate vector is kept
    np.testing.assert_allclose(out * np.abs(big).sum(-1, keepdims=True).clip(1), big, rtol=1e-12)


def test_stabilised_gates_stay_bounded_over_512_columns():
    rng = np.random.default_rng(10)
    x = rng.uniform(-1, 1, size=(8, 512, 2))
    raw = rng.normal(scale=1.5, size=(8, 512, 2, 3))
    # Nonnegative gates with sum <= 1: every output is a convex combination of inputs.
    convex = np.asarray(spn.propagate(x, spn.stabilize(np.abs(raw)), direction="left_to_right"))
    assert np.abs(convex).max() <= np.abs(x).max() + 1e-12
    # Signed stabilised gates: bounded; the same gates unstabilised blow up.
    signed = np.asarray(spn.propagate(x, spn.stabilize(raw), direction="left_to_right"))
    assert np.all(np.isfinite(signed)) and np.abs(signed).max() < 20
    unstable = np.asarray(spn.propagate(x, 1.5 * spn.stabilize(np.abs(raw)), direction="left_to_right"))
    assert not np.all(np.abs(unstable) < 1e6)


def test_vmap_and_jit():
    rng = np.random.default_rng(11)
    xb = rng.normal(size=(3, 5, 6, 2))
    gb = rng.normal(scale=0.4, size=(3, 4, 5, 6, 2, 3))
    batched = jax.jit(jax.vmap(spn.spn))(xb, gb)
    for b in range(3):
        np.testing.assert_allclose(np.asarray(batched[b]), np.asarray(spn.spn(xb[b], gb[b])), rtol=1e-12)
    one = jax.jit(spn.propagate, static_argnames="direction")(xb[0], gb[0, 2], direction="top_to_bottom")
    np.testing.assert_allclose(np.asarray(one), _numpy_propagate(xb[0], gb[0, 2], "top_to_bottom"), rtol=1e-12)


def test_float32_stays_float32():
    x, gates = _inputs(12)
    x32, g32 = x.astype(np.float32), gates.astype(np.float32)
    assert spn.propagate(x32, g32, direction="right_to_left").dtype == jnp.float32
    assert spn.spn(x32, np.stack([g32] * 4)).dtype == jnp.float32
    assert spn.stabilize(g32).dtype == jnp.float32
    assert spn.propagation_matrix(g32, direction="left_to_right").dtype == jnp.float32
    grad = jax.grad(lambda g: spn.propagate(x32, g, direction="left_to_right").sum())(g32)
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(spn.propagate(x32, g32, direction="top_to_bottom")), _numpy_propagate(x, gates, "top_to_bottom"), rtol=1e-4, atol=1e-5
    )


def test_bad_input():
    x, gates = _inputs(13)
    with pytest.raises(ValueError, match=r"gates: .*1 \(one-way\) or 3 \(three-way\), got 2"):
        spn.propagate(x, gates[..., :2], direction="left_to_right")
    with pytest.raises(ValueError, match=r"direction: expected one of .*got 'diagonal'"):
        spn.propagate(x, gates, direction="diagonal")
    with pytest.raises(ValueError, match=r"gates: expected shape .* got \(6, 6, 2, 3\)"):
        spn.propagate(x, gates[:, :6], direction="left_to_right")
    with pytest.raises(ValueError, match=r"x: expected a rank-3 array"):
        spn.propagate(x[..., 0], gates, direction="left_to_right")
    with pytest.raises(TypeError, match=r"x: expected a floating-point array"):
        spn.propagate(x.astype(np.int32), gates, direction="left_to_right")
    with pytest.raises(ValueError, match=r"gates: expected shape .*\(4, 6, 7, 2, 3\).*got \(3, 6, 7, 2, 3\)"):
        spn.spn(x, np.stack([gates] * 3))
    with pytest.raises(ValueError, match=r"merge: expected one of"):
        spn.spn(x, np.stack([gates] * 4), merge="sum")
    with pytest.raises(ValueError, match=r"channel: expected an index < C = 2, got 2"):
        spn.propagation_matrix(gates, direction="left_to_right", channel=2)
    with pytest.raises(ValueError, match=r"num_gates: expected 1"):
        spn.direction_offsets("left_to_right", 2)


# ------------------------------------------------------------ gradients of the adjoint recurrence


@pytest.mark.parametrize("g", [1, 3])
def test_vjp_matches_dense_oracle(g):
    """d/dx <cot, propagate(x)> = G^T cot, with G the dense propagation matrix (float64)."""
    x, gates = _inputs(14, shape=(4, 6, 2), g=g)
    cot = np.random.default_rng(15).normal(size=x.shape)
    for d in DIRECTIONS:
        gx = jax.jit(jax.grad(lambda v: jnp.sum(spn.propagate(v, gates, direction=d) * cot)))(x)
        for c in range(2):
            want = np.asarray(spn.propagation_matrix(gates, direction=d, channel=c)).T @ cot[:, :, c].reshape(-1)
            np.testing.assert_allclose(np.asarray(gx)[:, :, c].reshape(-1), want, rtol=1e-10, atol=1e-12)


def test_spn_max_gradient_goes_to_the_argmax_direction():
    """d/dx <cot, spn(x)> = sum_d G_d^T (cot * [d attains the max]) per channel (float64)."""
    rng = np.random.default_rng(16)
    x = rng.normal(size=(5, 4, 1))
    four = rng.normal(scale=0.4, size=(4, 5, 4, 1, 3))
    cot = rng.normal(size=x.shape)
    runs = np.stack([np.asarray(spn.propagate(x, four[i], direction=d)) for i, d in enumerate(DIRECTIONS)])
    winner = np.argmax(runs, axis=0)
    want = sum(np.asarray(spn.propagation_matrix(four[i], direction=d)).T @ (cot * (winner == i)).reshape(-1)
               for i, d in enumerate(DIRECTIONS))
    gx = jax.grad(lambda v: jnp.sum(spn.spn(v, four) * cot))(x)
    np.testing.assert_allclose(np.asarray(gx).reshape(-1), want, rtol=1e-10, atol=1e-12)


def test_check_grads_non_square_both_modes():
    """H != W, every direction in one stacked solve: reverse and forward mode."""
    rng = np.random.default_rng(17)
    x = rng.normal(size=(3, 5, 1))
    four = rng.normal(scale=0.3, size=(4, 3, 5, 1, 3))
    layer = jax.jit(lambda a, b: spn.spn(a, b, merge="mean"))
    check_grads(layer, (x, four), order=1, modes=("rev", "fwd"))
    one_way = rng.normal(scale=0.3, size=(4, 3, 5, 1, 1))
    check_grads(jax.jit(spn.spn), (x, one_way), order=1, modes=("rev",))


def test_vmap_of_the_vjp_and_jit_of_grad():
    rng = np.random.default_rng(18)
    xb = rng.normal(size=(3, 4, 6, 2))
    gb = rng.normal(scale=0.4, size=(3, 4, 4, 6, 2, 3))
    cot = rng.normal(size=xb.shape)

    def vjp_one(x, g, ct):
        _, vjp = jax.vjp(spn.spn, x, g)
        return vjp(ct)

    batched = jax.jit(jax.vmap(vjp_one))(xb, gb, cot)
    grad_fn = jax.jit(jax.grad(lambda x, g, ct: jnp.sum(spn.spn(x, g) * ct), argnums=(0, 1)))
    for b in range(3):
        for got, want in zip(batched, grad_fn(xb[b], gb[b], cot[b])):
            np.testing.assert_allclose(np.asarray(got[b]), np.asarray(want), rtol=1e-12, atol=1e-12)
