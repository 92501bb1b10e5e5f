"""bfloat16 compute, rematerialisation and gradient accumulation (rwseg.layers.memory,
rwseg.train.state): each lever must leave the training step what it was (exactly for remat
and microbatches, to a stated tolerance for bfloat16), and the solvers must still converge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.test_util import check_grads

from rwseg import configs, data, gcrf, rwn, stencil
from rwseg.models import build_model
from rwseg.layers.convs import ConvBlock, set_compute_dtype
from rwseg.layers.memory import remat_scope
from rwseg.train.state import create, make_train_step, split_microbatches
from flax import nnx

STEP = 3  # past the smoke config's one warmup step: a nonzero learning rate
# one method for the step tests (4 train-step compilations in all, shared): GCRF has the backbone,
# the pairwise network and the unrolled GMF layers, so every lever is exercised
METHOD = "gcrf"
# the step tests run in one pytest-xdist worker (``--dist loadgroup``, pyproject.toml), so that
# GCRF's plain step, which each of them compares with, compiles and runs once
SHARED_STEPS = pytest.mark.xdist_group("memory_levers_gcrf_steps")


def _mesh():
    return Mesh(np.asarray(jax.devices()[:1]), ("data",))


def _rngs():
    """rbg keys: an eager model build initialises op by op, ~4x faster than with threefry keys."""
    return nnx.Rngs(jax.random.key(0, impl="rbg"))


def _batch(num_classes, b=4, s=32, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.random((b, s, s, 3), np.float32),
            "label": rng.integers(0, num_classes, (b, s, s)).astype(np.int32)}


def _config(method, **changes):
    c = configs.get_config(method, "smoke")
    for k, v in changes.items():
        c[k] = v
    return c


def _sgd_config(method, **changes):
    """The smoke config trained by SGD: its update is the (clipped, momentum-summed) gradient
    itself, so comparing updates compares gradients (Adam's per-parameter normalisation would
    turn the rounding noise of near-zero gradients into updates of full size)."""
    c = _config(method, **changes)
    c.optimizer.name = "sgd"
    return c


_STEPS = {}


def _step(method, **changes):
    """(params before, params after two train steps, the second step's metrics) of the smoke config
    with ``changes`` (cached: the tests below share their compilations)."""
    key = (method, tuple(sorted(changes.items())))
    if key not in _STEPS:
        config = _sgd_config(method, **changes)
        k = data.dataset_info(config.data.name).num_classes
        setup = create(config, k, {})
        copy = lambda tree: jax.tree.map(lambda x: np.array(x, copy=True), tree)  # noqa: E731
        before = copy(setup.state["params"])  # the step donates (and overwrites) the state's buffers
        step = make_train_step(setup, _mesh())
        # two steps: optax counts its own steps, and the schedule's warmup gives the first a zero rate
        state, _ = step(setup.state, _batch(k, seed=1), STEP - 1)
        new, metrics = step(state, _batch(k), STEP)
        _STEPS[key] = before, copy(new["params"]), jax.tree.map(float, metrics)
    return _STEPS[key]


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --------------------------------------------------------------------------- operators


def test_gmf_remat_same_value_and_gradient():
    rng = np.random.default_rng(0)
    offs = gcrf.bipartite_offsets(1)
    z, filters = rng.normal(size=(5, 6, 3)), rng.normal(scale=0.4, size=(3, 2))
    s = gcrf.pairwise_similarity(z, filters, offs)
    compat = gcrf.compatibility(rng.normal(size=(2, 2)))
    unary = rng.normal(size=(5, 6, 2))
    g = rng.normal(size=unary.shape)

    def loss(u, s, c, remat):
        return jnp.sum(g * gcrf.gmf(u, s, c, offs, num_steps=3, remat=remat))

    want = jax.grad(loss, argnums=(0, 1, 2))(unary, s, compat, False)
    got = jax.grad(loss, argnums=(0, 1, 2))(unary, s, compat, True)
    assert _max_diff(want, got) < 1e-12
    check_grads(lambda u: gcrf.gmf(u, s, compat, offs, num_steps=2, remat=True), (unary,), order=1, modes=("rev",))


def test_random_walk_remat_same_value_and_gradient():
    rng = np.random.default_rng(1)
    offs = stencil.disk_offsets(1)
    w = jnp.asarray(rng.random((5, 6, len(offs))))
    f = jnp.asarray(rng.normal(size=(5, 6, 3)))
    g = rng.normal(size=f.shape)

    def loss(w, f, remat):
        return jnp.sum(g * rwn.random_walk(w, f, offs, alpha=0.8, num_steps=2, remat=remat))

    want = jax.grad(loss, argnums=(0, 1))(w, f, False)
    got = jax.grad(loss, argnums=(0, 1))(w, f, True)
    assert _max_diff(want, got) < 1e-12


# --------------------------------------------------------------------------- model and step


def test_compute_dtype_reaches_every_conv_block_and_keeps_params_float32():
    config = _config("spn", compute_dtype="bfloat16")
    model = nnx.eval_shape(lambda: build_model(config, 3, rngs=nnx.Rngs(0)))  # abstract: no initialisation
    blocks = [m for _, m in nnx.iter_modules(model) if isinstance(m, ConvBlock)]
    assert blocks and all(b.conv.dtype == jnp.bfloat16 and b.norm.dtype == jnp.bfloat16 for b in blocks)
    assert model.refinement.gates.dtype is None  # the gates head promotes to float32
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    backbone = build_model(_config("baseline", compute_dtype="bfloat16"), 3, rngs=_rngs()).backbone
    out = nnx.jit(lambda m, x: m(x))(backbone, jnp.zeros((1, 32, 32, 3), jnp.float32))
    assert out["stem"].dtype == jnp.bfloat16 and out["features"].dtype == jnp.bfloat16
    assert out["logits"].dtype == jnp.float32  # heads (and so every solver input) stay float32
    with pytest.raises(ValueError, match="config.compute_dtype"):
        set_compute_dtype(model, "float16")


@SHARED_STEPS
def test_remat_step_equals_the_plain_step():
    """config.remat recomputes blocks and GMF layers in the backward pass: the same update."""
    _, plain, m0 = _step(METHOD)
    _, remat, m1 = _step(METHOD, remat=True)
    assert _max_diff(plain, remat) < 1e-6
    assert abs(m0["loss"] - m1["loss"]) < 1e-6 and abs(m0["grad_norm"] - m1["grad_norm"]) < 1e-5


@SHARED_STEPS
def test_microbatches_equal_one_large_batch():
    """Two microbatches of 2 give the step of the batch of 4 (dense labels: equal pixel counts)."""
    method = METHOD
    before, whole, m0 = _step(method)
    _, micro, m1 = _step(method, microbatches=2)
    assert _max_diff(before, whole) > 1e-4  # the step moved the parameters
    assert _max_diff(whole, micro) < 1e-5
    for key in m0:
        assert abs(m0[key] - m1[key]) <= 1e-5 * max(1.0, abs(m0[key])), key


def test_microbatches_must_divide_the_device_batch():
    config = _config("baseline", microbatches=3)
    setup = create(config, 3, {})
    with pytest.raises(ValueError, match="config.microbatches"):
        make_train_step(setup, _mesh())(setup.state, _batch(3), STEP)


def test_split_microbatches_takes_every_m_th_example():
    x = np.arange(8)
    got = np.asarray(split_microbatches({"x": x}, 2, _mesh())["x"])
    np.testing.assert_array_equal(got, [[0, 2, 4, 6], [1, 3, 5, 7]])


@SHARED_STEPS
def test_bfloat16_step_matches_float32():
    """Tolerance: loss within 1 %, and an update (SGD: the gradient) of cosine >= 0.97 with
    float32's over all parameters, >= 0.9 for each tensor that moves. bfloat16 keeps 8 bits of
    mantissa (~0.2 % per rounding); the backward pass through the conv blocks compounds it, most in
    the earliest layers (measured on GCRF's smoke step: 0.98 overall, 0.92 for the worst tensor, the
    stem's GroupNorm scale, and 0.9999 for the float32 heads and GMF parameters)."""
    before, f32, m0 = _step(METHOD)
    _, bf16, m1 = _step(METHOD, compute_dtype="bfloat16")
    assert abs(m0["loss"] - m1["loss"]) <= 0.01 * abs(m0["loss"])

    def cosine(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    d0 = [np.ravel(a - b) for a, b in zip(jax.tree.leaves(f32), jax.tree.leaves(before))]
    d1 = [np.ravel(a - b) for a, b in zip(jax.tree.leaves(bf16), jax.tree.leaves(before))]
    assert all(d.dtype == np.float32 for d in d1)  # parameters stay float32
    assert cosine(np.concatenate(d0), np.concatenate(d1)) >= 0.97
    moving = [(a, b) for a, b in zip(d0, d1) if np.linalg.norm(a) > 1e-8]  # not the ~1e-14 updates
    assert len(moving) >= len(d0) - 1
    assert min(cosine(a, b) for a, b in moving) >= 0.9


@pytest.mark.slow
def test_bfloat16_training_reaches_float32_metrics(tmp_path):
    """Trained in bfloat16, the baseline scores what float32 scores on the synthetic task.

    The smoke model (the compact backbone with its ASPP head: the conv blocks every method runs
    in bfloat16) trained for 400 steps from the same seed and data stream in each dtype, then
    evaluated on the same 32 validation scenes. Tolerance: 3 points of mIoU and boundary F, 2 of pixel accuracy. Measured
    (2026-12, jax 0.10.2, CPU), bfloat16 - float32 over seeds 0, 1, 2: mIoU -1.9 / -0.1 / +0.6,
    pixel accuracy -0.9 / -0.8 / -0.1, boundary F -1.4 / -0.8 / -1.0 points, while float32 alone
    ranges over 29.0-29.7 mIoU and 61.8-69.6 boundary F across those seeds; 60 steps in (mIoU 11)
    the model has not learned the scenes yet, hence the floor on mIoU.
    """
    from _train_cli import smoke_config
    from rwseg.train.trainer import train_and_evaluate

    got = {}
    for dtype in ("float32", "bfloat16"):
        config = smoke_config("baseline", num_steps=400, checkpoint_every=400, compute_dtype=dtype, eval_batches=0,
                              num_panels=0, **{"data.synthetic.num_validation": 32})
        got[dtype] = train_and_evaluate(config, tmp_path / dtype)
    f32, bf16 = got["float32"], got["bfloat16"]
    assert f32["mean_iou"] > 0.2 and bf16["mean_iou"] > 0.2  # both learned (chance-level runs would agree too)
    assert abs(bf16["mean_iou"] - f32["mean_iou"]) <= 0.03
    assert abs(bf16["pixel_accuracy"] - f32["pixel_accuracy"]) <= 0.02
    assert abs(bf16["boundary_fscore"] - f32["boundary_fscore"]) <= 0.03


@pytest.mark.parametrize("method", ["rwn", "gcrf"])
def test_bfloat16_solvers_still_converge(method):
    """The converged walk (CG to 1e-5) and GMF (to 1e-4) under bfloat16 convolutions: float32
    solver inputs, every example converged, scores close to float32's."""
    k = 3
    images = jnp.asarray(_batch(k, b=2)["image"])
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = build_model(_config(method, compute_dtype=dtype), k, rngs=_rngs())
        scores, info = model.predict(images, return_info=True)
        assert scores.dtype == jnp.float32
        assert int(np.sum(info["nonconverged"])) == 0 and int(np.sum(info["solves"])) == 2
        out[dtype] = np.asarray(scores)
    scale = np.max(np.abs(out["float32"]))
    assert np.max(np.abs(out["float32"] - out["bfloat16"])) <= 0.05 * scale


def test_remat_scope_is_a_context():
    from rwseg.layers.memory import remat_enabled

    assert not remat_enabled()
    with remat_scope(True):
        assert remat_enabled()
        with remat_scope(False):
            assert not remat_enabled()
    assert not remat_enabled()


def test_group_norm_in_bfloat16_matches_flax_group_norm():
    """The bfloat16 normalisation against nnx.GroupNorm on the same (float32) input: within bfloat16
    rounding (2^-8 relative of the output's scale); float32 input: nnx.GroupNorm itself."""
    from rwseg.layers.memory import group_norm

    rng = np.random.default_rng(3)
    norm = nnx.GroupNorm(16, num_groups=8, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
    norm.bias[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
    x = jnp.asarray(rng.normal(loc=2.0, size=(2, 6, 5, 16)), jnp.float32)
    want = np.asarray(norm(x))
    np.testing.assert_array_equal(np.asarray(group_norm(norm, x)), want)
    norm.dtype = jnp.bfloat16
    got = group_norm(norm, x.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2 ** -6 * np.abs(want).max())
