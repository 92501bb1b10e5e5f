"""The Pallas SPN kernel (rwseg.spn_pallas) in interpret mode against the lax.scan path.

Small maps only (interpret mode runs the kernel's loop in Python-level JAX ops): odd
sizes, H != W, one-way and three-way gates, all four directions, float32, values and
gradients, under vmap and jit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwseg import spn, spn_pallas, spn_verify
from rwseg.spn import DIRECTIONS


def _inputs(seed, shape=(5, 7, 3), g=3, lead=(4,), dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(dtype)
    gates = np.asarray(spn.stabilize(rng.normal(scale=0.6, size=lead + shape + (g,)).astype(dtype)))
    cot = rng.normal(size=shape).astype(dtype)
    return x, gates, cot


def _segmented_problem(seed, g, channels):
    """Kernel inputs: 6 steps, 3 row segments of 5 rows, ``channels`` channels, ``g`` gates.

    The gates that cross a segment boundary are zero, as spn's stacked layout makes them.
    """
    rng = np.random.default_rng(seed)
    b = jnp.asarray(rng.normal(size=(6, 3 * 5, channels)).astype(np.float32))
    p = jnp.asarray(rng.normal(scale=0.5, size=(6, g, 3 * 5, channels)).astype(np.float32))
    if g == 3:
        p = p.at[:, 0, 0::5].set(0).at[:, 2, 4::5].set(0)
    return b, p


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("g", [1, 3])
def test_kernel_matches_scan_recurrence(g, transpose):
    """Several row segments and channel tiles per call: every program sees only its block."""
    b, p = _segmented_problem(0, g, channels=4)
    want = spn_pallas.scan_recurrence(b, p, transpose=transpose)
    for tile in (1, 2, 4):
        got = spn_pallas.recurrence(b, p, transpose=transpose, segment_rows=5, channel_tile_size=tile, interpret=True)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_kernel_rejects_a_bad_tiling():
    b, p = jnp.zeros((3, 10, 3), jnp.float32), jnp.zeros((3, 3, 10, 3), jnp.float32)
    with pytest.raises(ValueError, match="must divide R=10 and C=3"):
        spn_pallas.recurrence(b, p, segment_rows=4, interpret=True)


@pytest.mark.parametrize("shape, g", [((5, 7, 3), 3), ((6, 3, 2), 1)])
def test_spn_pallas_values_and_gradients(shape, g):
    x, gates, cot = _inputs(1, shape, g)

    def loss(impl):
        return jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(spn.spn(a, b, implementation=impl) * cot), (0, 1)))

    (v_s, (gx_s, gg_s)), (v_p, (gx_p, gg_p)) = loss("scan")(x, gates), loss("pallas")(x, gates)
    assert gx_p.dtype == jnp.float32 and gg_p.dtype == jnp.float32
    np.testing.assert_allclose(float(v_p), float(v_s), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gx_p), np.asarray(gx_s), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gg_p), np.asarray(gg_s), rtol=1e-4, atol=1e-5)
    for merge in ("max", "mean"):
        np.testing.assert_allclose(
            np.asarray(spn.spn(x, gates, merge=merge, implementation="pallas")),
            np.asarray(spn.spn(x, gates, merge=merge, implementation="scan")), rtol=1e-5, atol=1e-6)


def test_propagate_pallas_every_direction():
    """Three-way, each direction alone (one-way is covered through spn above)."""
    x, gates, cot = _inputs(2, (5, 7, 3), 3)

    @functools.partial(jax.jit, static_argnums=2)
    def value_and_vjp(a, b, d):
        out = {}
        for impl in ("scan", "pallas"):
            h, vjp = jax.vjp(lambda a, b: spn.propagate(a, b, direction=d, implementation=impl), a, b)
            out[impl] = (h,) + vjp(cot)  # the vector-Jacobian product runs the transposed kernel
        return out

    for i, d in enumerate(DIRECTIONS):
        got = value_and_vjp(x, gates[i], d)
        for p, s in zip(got["pallas"], got["scan"]):
            np.testing.assert_allclose(np.asarray(p), np.asarray(s), rtol=1e-4, atol=1e-5)


def test_pallas_under_vmap_and_jit():
    rng = np.random.default_rng(3)
    xb = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
    gb = np.asarray(spn.stabilize(rng.normal(scale=0.6, size=(2, 4, 5, 7, 3, 3)).astype(np.float32)))
    cot = rng.normal(size=xb.shape).astype(np.float32)

    def grads(impl):
        layer = jax.vmap(lambda a, b: spn.spn(a, b, implementation=impl))
        return jax.jit(jax.grad(lambda a, b: jnp.sum(layer(a, b) * cot), (0, 1)))(xb, gb)

    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.vmap(lambda a, b: spn.spn(a, b, implementation="pallas")))(xb, gb)),
        np.asarray(jax.vmap(lambda a, b: spn.spn(a, b, implementation="scan"))(xb, gb)), rtol=1e-5, atol=1e-6)
    for got, want in zip(grads("pallas"), grads("scan")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_implementation_argument():
    x, gates, _ = _inputs(4, (4, 5, 2), 3)
    with pytest.raises(ValueError, match=r"implementation: expected one of \('auto', 'scan', 'pallas'\), got 'cuda'"):
        spn.spn(x, gates, implementation="cuda")
    # on this CPU backend, auto is the scan
    np.testing.assert_array_equal(np.asarray(spn.spn(x, gates)), np.asarray(spn.spn(x, gates, implementation="scan")))


def test_kernel_lowers_for_tpu():
    """Mosaic TPU lowering runs without a TPU (compiling it for the chip needs one)."""
    b, p = jnp.ones((16, 32, 128), jnp.float32), jnp.ones((16, 3, 32, 128), jnp.float32)
    f = jax.jit(lambda b, p: spn_pallas.recurrence(b, p, segment_rows=8, channel_tile_size=128))
    f.trace(b, p).lower(lowering_platforms=("tpu",))


def test_kernel_lowers_for_cuda():
    """The Triton variant lowers for CUDA without a GPU (forward and transpose, odd sizes padded)."""
    b, p = jnp.ones((9, 3 * 13, 5), jnp.float32), jnp.ones((9, 3, 3 * 13, 5), jnp.float32)
    for transpose in (False, True):
        f = jax.jit(lambda b, p: spn_pallas.recurrence_gpu(b, p, transpose=transpose, segment_rows=13))
        assert "xla.gpu.triton" in f.trace(b, p).lower(lowering_platforms=("cuda",)).as_text()
    assert spn_pallas.gpu_kernel_lowers(9, 4 * 9, 3, 1, "float32", 9, "cuda")
    # the check "auto" relies on says no where the kernel does not lower (Triton params on TPU)
    assert not spn_pallas.gpu_kernel_lowers(9, 4 * 9, 3, 1, "float32", 9, "tpu")


def test_spn_layer_lowers_for_cuda():
    """The whole layer, batched and differentiated, with the GPU kernel (not interpreted)."""
    x, g = jnp.ones((2, 5, 7, 3), jnp.float32), jnp.full((2, 4, 5, 7, 3, 3), 0.1, jnp.float32)
    layer = jax.vmap(lambda a, b: sum(spn._propagate_stacked_jit(a, b, DIRECTIONS, "pallas_gpu", False)))
    text = jax.jit(jax.grad(lambda a, b: jnp.sum(layer(a, b)), (0, 1))).trace(x, g).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2  # the forward and the transposed kernel


def test_auto_uses_the_gpu_kernel_only_if_it_lowers(monkeypatch):
    x, gates, _ = _inputs(5, (5, 7, 3), 3)
    asked = []

    def lowers(answer):
        def fake(*args):
            asked.append(args)
            return answer
        return fake

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setitem(spn_verify.RECORDED, "pallas_gpu", (spn_verify.device_kind(),))  # verified here (mocked)
    monkeypatch.setattr(spn_pallas, "gpu_kernel_lowers", lowers(True))
    assert spn._resolve_implementation("auto", x, gates, DIRECTIONS) == "pallas_gpu"
    assert asked == [(7, 4 * 7, 3, 3, "float32", 7)]  # T = max(H, W), 4 segments of max(H, W) rows
    assert spn._resolve_implementation("pallas", x, gates, DIRECTIONS) == "pallas_gpu"
    assert spn._resolve_implementation("scan", x, gates, DIRECTIONS) == "scan"
    monkeypatch.setattr(spn_pallas, "gpu_kernel_lowers", lowers(False))
    assert spn._resolve_implementation("auto", x, gates[:1], ("left_to_right",)) == "scan"
    assert asked[-1] == (7, 5, 3, 3, "float32", 5)  # left_to_right: T = W, rows = H


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("g", [1, 3])
def test_gpu_kernel_matches_scan_recurrence(g, transpose):
    """Segments of 5 rows (padded to 8), 3 channels (padded to the tile), several tiles."""
    b, p = _segmented_problem(6, g, channels=3)
    want = spn_pallas.scan_recurrence(b, p, transpose=transpose)
    for tile in (None, 1, 2):  # None: one tile of 4 (channels padded); 1: no padding; 2: two tiles, padded
        got = spn_pallas.recurrence_gpu(b, p, transpose=transpose, segment_rows=5, channel_tile_size=tile,
                                        interpret=True)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="channel_tile_size: expected a power of two, got 3"):
        spn_pallas.recurrence_gpu(b, p, segment_rows=5, channel_tile_size=3, interpret=True)


@pytest.mark.parametrize("g", [1, 3])
def test_mirrored_gates_give_the_transposed_step(g):
    """P^T v = sum_j shift(p_{G-1-j}, d_j) * shift(v, d_j), against the dense P_t."""
    rng = np.random.default_rng(7)
    p_t = rng.normal(size=(g, 6, 1))
    lam = rng.normal(size=(6, 1))
    dense = sum(np.diag(p_t[k, :, 0]) @ np.eye(6, k=d) for k, d in enumerate(spn_pallas.ROW_STEPS[g]))
    got = spn_pallas.column_step(jnp.zeros((6, 1)), spn_pallas.mirrored_gates(jnp.asarray(p_t)), jnp.asarray(lam))
    np.testing.assert_allclose(np.asarray(got), dense.T @ lam, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(spn_pallas.column_step_transposed(jnp.asarray(p_t), jnp.asarray(lam))),
                               dense.T @ lam, rtol=1e-6)


@pytest.mark.parametrize("shape, g, directions", [((5, 7, 3), 3, DIRECTIONS), ((6, 3, 2), 1, DIRECTIONS),
                                                  ((5, 6, 2), 3, ("bottom_to_top",))])
def test_gpu_variant_values_and_vjp(shape, g, directions):
    """The stacked solve with the GPU kernel (interpret mode) against the scan: maps and VJPs."""
    x, gates, cot = _inputs(8, shape, g, lead=(len(directions),))

    @functools.partial(jax.jit, static_argnums=2)
    def value_and_vjp(a, b, impl):
        outs, vjp = jax.vjp(lambda a, b: spn._propagate_stacked_jit(a, b, directions, impl, True), a, b)
        return outs, vjp([cot] * len(directions))

    got, want = value_and_vjp(x, gates, "pallas_gpu"), value_and_vjp(x, gates, "scan")
    for p, s in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert p.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(p), np.asarray(s), rtol=1e-4, atol=1e-5)


def test_gpu_variant_under_vmap():
    """Batched (vmap adds a grid axis), values and gradients of the merged layer."""
    rng = np.random.default_rng(9)
    xb = rng.normal(size=(2, 4, 6, 2)).astype(np.float32)
    gb = np.asarray(spn.stabilize(rng.normal(scale=0.6, size=(2, 4, 4, 6, 2, 3)).astype(np.float32)))

    def value_and_grads(impl):
        layer = jax.vmap(lambda a, b: functools.reduce(
            jnp.maximum, spn._propagate_stacked_jit(a, b, DIRECTIONS, impl, True)))
        return jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(layer(a, b))), (0, 1)))(xb, gb)

    for got, want in zip(jax.tree.leaves(value_and_grads("pallas_gpu")), jax.tree.leaves(value_and_grads("scan"))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
