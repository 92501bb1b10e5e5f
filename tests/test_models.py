"""Models: backbone shapes, shared losses/helpers against numpy oracles, the registry, and
every method's config training a few steps on the built-in data with a decreasing loss."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rwseg.models import METHODS, build_model, model_class
from rwseg.layers.grid import PIXELS, avg_pool, pooled_grid, subsample_labels, subsample_scribbles, upsample
from rwseg.models.backbone import Backbone, encoder_grid
from rwseg.models.common import cross_entropy
from rwseg.train.config_files import load_config_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "rwseg" / "configs"


def smoke(method):
    return load_config_file(str(CONFIGS / f"{method}.py"), "smoke")


def _apply(x, **kw):
    """Build and apply a Backbone inside one jit (eager NNX init compiles op by op: slow)."""
    return jax.jit(lambda x: Backbone(rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), **kw)(x))(x)


def test_backbone_shapes_and_dtype():
    out = _apply(jnp.zeros((2, 32, 40, 3), jnp.float32), num_classes=5, width=4, depth=1, aspp_rates=(1, 2), features=8)
    assert out["stem"].shape == (2, 32, 40, 4)
    assert out["features"].shape == (2, 4, 5, 8)
    assert out["logits"].shape == (2, 4, 5, 5)
    assert all(v.dtype == jnp.float32 for v in out.values())  # x64 is on in tests: no promotion


def test_backbone_without_norm_and_bad_norm():
    out = _apply(jnp.zeros((1, 16, 16, 3), jnp.float32), num_classes=3, width=4, features=8, norm="none")
    assert out["logits"].shape == (1, 2, 2, 3)
    with pytest.raises(ValueError, match="norm"):
        Backbone(3, width=4, norm="batch", rngs=nnx.Rngs(0))


def _linear_backbone(size):
    """The real Backbone (norm='none') with every conv set to a symmetric channel-parity-preserving average,
    applied to the ramps (y + 0.5, x + 0.5) (pixel-centre coordinates, positive so ReLU is the identity): a
    linear, symmetric network, so away from the zero-padded border each output cell holds the continuous
    coordinates of its true centre. Returns the (1, h, w, 2) logits."""
    def run():
        bb = Backbone(2, width=2, depth=1, aspp_rates=(1, 2), features=2, norm="none", in_channels=2,
                      rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
        for _, m in nnx.iter_graph(bb):
            if isinstance(m, nnx.Conv):
                kh, kw, cin, cout = m.kernel.shape
                par = (np.arange(cin)[:, None] % 2) == (np.arange(cout)[None, :] % 2)
                mix = par / par.sum(axis=0, keepdims=True)
                m.kernel[...] = jnp.asarray(np.ones((kh, kw, 1, 1)) / (kh * kw) * mix[None, None], jnp.float32)
                if m.bias is not None:
                    m.bias[...] = jnp.zeros_like(m.bias[...])
        yy, xx = jnp.meshgrid(jnp.arange(size[0]) + 0.5, jnp.arange(size[1]) + 0.5, indexing="ij")
        return bb(jnp.stack([yy, xx], axis=-1)[None].astype(jnp.float32))["logits"]
    return jax.jit(run)()


@pytest.mark.parametrize("size", [(192, 200), (191, 198)])
def test_encoder_cells_upsample_to_their_true_pixel_centres(size):
    # Regression: stride-2 'SAME' 3x3 convs on even inputs centre cell i on input pixel 2i + 1 (+0.5 px per
    # stage, +3.5 px at 1/8) while jax.image.resize assumes 2i + 0.5; the shared upsampler must compensate.
    logits = _linear_backbone(size)
    h, w = logits.shape[1:3]
    grid = Backbone.grid(size)
    assert grid == (encoder_grid(size[0]), encoder_grid(size[1]))
    if size == (192, 200):
        assert grid[0].stride == 8 and grid[0].offset == grid[1].offset == 3.5
    ci, cj = np.arange(h) * grid[0].stride + grid[0].stride / 2 + grid[0].offset, \
        np.arange(w) * grid[1].stride + grid[1].stride / 2 + grid[1].offset
    inner_i, inner_j = slice(6, h - 6), slice(6, w - 6)  # cells whose receptive field misses the padding
    np.testing.assert_allclose(np.asarray(logits[0, inner_i, inner_j, 0]),
                               np.broadcast_to(ci[inner_i, None], (h - 12, w - 12)), atol=0.05)
    np.testing.assert_allclose(np.asarray(logits[0, inner_i, inner_j, 1]),
                               np.broadcast_to(cj[None, inner_j], (h - 12, w - 12)), atol=0.05)
    # ... and the upsampler puts them there: the ramps come back at every interior pixel, in both axes
    up = np.asarray(upsample(logits, size, grid))
    rows, cols = slice(56, size[0] - 56), slice(56, size[1] - 56)
    yy, xx = np.meshgrid(np.arange(size[0]) + 0.5, np.arange(size[1]) + 0.5, indexing="ij")
    np.testing.assert_allclose(up[0, rows, cols, 0], yy[rows, cols], atol=0.05)
    np.testing.assert_allclose(up[0, rows, cols, 1], xx[rows, cols], atol=0.05)


def test_upsample_between_grids():
    x = jax.random.normal(jax.random.key(1), (2, 4, 5, 3))
    # aligned block grids: exactly jax.image.resize (edge values outside)
    np.testing.assert_allclose(upsample(x, (32, 40), pooled_grid(8)),
                               jax.image.resize(x, (2, 32, 40, 3), "bilinear"), atol=1e-6)
    # encoder grid -> walk grid (1/4) -> pixels equals encoder grid -> pixels on a linear ramp's interior
    ramp = (jnp.arange(8.0)[:, None] + 2 * jnp.arange(8.0)[None, :])[None, ..., None]
    g = Backbone.grid((64, 64))
    direct = upsample(ramp, (64, 64), g)
    via = upsample(upsample(ramp, (16, 16), g, pooled_grid(4)), (64, 64), pooled_grid(4), PIXELS)
    np.testing.assert_allclose(direct[0, 16:48, 16:48], via[0, 16:48, 16:48], atol=1e-5)


def test_cross_entropy_matches_numpy_with_ignore():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 5))
    labels = rng.integers(0, 5, size=(2, 3, 4))
    labels[0, 0, :2] = 255
    labels[1, 2, 3] = -1
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = (labels >= 0) & (labels != 255)
    expected = -np.mean([logp[b, i, j, labels[b, i, j]] for b, i, j in zip(*np.nonzero(valid))])
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), expected, rtol=1e-12)
    assert float(cross_entropy(jnp.asarray(logits), jnp.full((2, 3, 4), 255))) == 0.0


def test_cross_entropy_equals_the_previous_log_softmax_formula():
    """The optax-based cross_entropy (issue 10, item 4) equals the hand-written one it replaced,
    value and gradient, in float32, with ignored (255, negative, >= K) pixels; unlike it, a NaN
    logit at an ignored pixel no longer leaks into the loss or the gradient."""
    from rwseg._numerics import masked_mean

    def previous(logits, labels, ignore_index=255):
        valid = (labels >= 0) & (labels != ignore_index) & (labels < logits.shape[-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
        return masked_mean(nll, valid)

    rng = np.random.default_rng(1)
    logits = jnp.asarray(3 * rng.normal(size=(2, 8, 8, 6)), jnp.float32)
    labels = rng.integers(0, 6, size=(2, 8, 8))
    labels[0, :2] = 255
    labels[1, 3, :4] = -1
    labels[1, 5, 5] = 7
    labels = jnp.asarray(labels, jnp.int32)
    got = cross_entropy(logits, labels)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, previous(logits, labels), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(cross_entropy)(logits, labels), jax.grad(previous)(logits, labels),
                               rtol=1e-5, atol=1e-8)
    bad = logits.at[0, 0, 0, 2].set(jnp.nan)  # at an ignored pixel
    np.testing.assert_allclose(cross_entropy(bad, labels), got, rtol=1e-6)
    grad = jax.grad(cross_entropy)(bad, labels)
    assert bool(jnp.all(jnp.isfinite(grad))) and bool(jnp.all(grad[0, :2] == 0))


def test_resampling_helpers():
    x = np.arange(2 * 4 * 6 * 3, dtype=np.float64).reshape(2, 4, 6, 3)
    expected = x.reshape(2, 2, 2, 3, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(avg_pool(jnp.asarray(x), 2), expected)
    labels = np.array([[[0, 1, 2, 2], [1, 1, 2, 255], [3, 3, 255, 255], [0, 3, 255, 255]]])
    # block majority among valid labels (ties -> smallest), ignore when a block has none
    np.testing.assert_array_equal(subsample_labels(jnp.asarray(labels), 2, 4), [[[1, 2], [3, 255]]])
    scrib = -np.ones((1, 4, 4), np.int32)
    scrib[0, 3, 0] = 2  # a one-pixel stroke on an odd row survives the 2x2 downsampling
    out = np.asarray(subsample_scribbles(jnp.asarray(scrib), 2))
    np.testing.assert_array_equal(out, [[[-1, -1], [2, -1]]])
    with pytest.raises(ValueError, match="divisible"):
        avg_pool(jnp.zeros((1, 5, 4, 1)), 2)


def test_registry():
    assert set(METHODS) == {"baseline", "rwn", "rawks", "spn", "gcrf", "dilated"}
    with pytest.raises(ValueError, match="config.method"):
        model_class("crf")
    with pytest.raises(ValueError, match="statistics"):
        build_model(smoke("dilated"), 6, rngs=nnx.Rngs(0))


def test_every_config_file_has_its_method():
    for method in METHODS:
        config = smoke(method)
        assert config.method == method
        full = load_config_file(str(CONFIGS / f"{method}.py"))
        assert full.num_steps > config.num_steps
    with pytest.raises(ValueError, match="smoke"):
        load_config_file(str(CONFIGS / "baseline.py"), "tiny")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A private TFDS data dir (no race with other pytest-xdist workers building the dataset)."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_with_decreasing_loss(method, tfds_dir):
    """A few steps of each method's smoke config on one batch of the built-in data:
    the loss decreases; predictions have the image's size and are finite."""
    from rwseg import data
    from rwseg.train import parallel
    from rwseg.train.state import compute_statistics, create, make_train_step, source_kwargs

    config = smoke(method)
    config.data.data_dir = tfds_dir
    source = data.load_source(config.data.name, "train", **source_kwargs(config))
    setup = create(config, data.dataset_info("synthetic").num_classes, compute_statistics(config, source))
    mesh = parallel.make_mesh()
    state = parallel.replicate(setup.state, mesh)
    keys = ("image", "label", "scribbles") if config.data.scribbles else ("image", "label")
    batch = next(data.make_batches(source, batch_size=config.batch_size, crop_size=config.data.crop_size,
                                   train=True, seed=0, num_steps=1, scribbles=config.data.scribbles))
    batch = parallel.global_batch({k: batch[k] for k in keys}, mesh)
    step = make_train_step(setup, mesh)
    losses = []
    for i in range(6):
        state, metrics = step(state, batch, np.int32(i))
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0] - 1e-3, f"{method}: loss did not decrease: {losses}"
    from rwseg.train.state import merge

    scores = merge(setup.graphdef, state).predict(batch["image"])
    assert scores.shape == batch["image"].shape[:3] + (setup.num_classes,)
    assert scores.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(scores)))


def _eval_solves(config):
    """nonconverged_fraction and solve count of one eval step on a synthetic batch (1 device)."""
    from rwseg import data
    from rwseg.data.synthetic import NUM_CLASSES, synthetic_example
    from rwseg.models import dataset_statistics
    from rwseg.train import parallel
    from rwseg.train.evaluate import make_eval_step, summarize_counts
    from rwseg.train.state import create

    size = config.data.synthetic.image_size
    examples = [synthetic_example(0, "validation", i, (size, size)) for i in range(config.eval_batch_size)]
    batch = {"image": np.stack([data.normalize(e["image"]) for e in examples]).astype(np.float32),
             "label": np.stack([e["label"] for e in examples]).astype(np.int32)}
    setup = create(config, NUM_CLASSES, dataset_statistics(config, batch["label"]))
    mesh = parallel.make_mesh()
    step = make_eval_step(setup.graphdef, mesh, NUM_CLASSES, config.trimap_widths, config.boundary_tolerance)
    _, counts = step(parallel.replicate(setup.state, mesh), parallel.global_batch(batch, mesh))
    counts = parallel.to_host(counts)
    result = summarize_counts(counts, [float(w) for w in config.trimap_widths], config.boundary_tolerance)
    assert result["out_of_range_labels"] == 0 and result["out_of_range_pred"] == 0  # counted, none here
    return result["nonconverged_fraction"], int(counts["solves"][1])


@pytest.mark.parametrize("method", ["rwn", "gcrf"])
def test_evaluation_reports_nonconverged_solves(method):
    """Solver diagnostics reach the metrics: the smoke config's solves all converge; one
    iteration per solve converges none."""
    config = smoke(method)
    assert _eval_solves(config) == (0.0, config.eval_batch_size)
    config[method].layer.max_iters = 1
    fraction, solves = _eval_solves(config)
    assert solves == config.eval_batch_size and fraction == 1.0


def test_methods_without_solvers_report_zero_solves():
    assert _eval_solves(smoke("baseline")) == (0.0, 0)


def test_predict_info_and_rawks_propagation_info():
    """predict(return_info=True) has the same scores; RAWKS's P solve reports non-convergence."""
    from rwseg.models.base import no_solves, solver_stats

    stats = solver_stats(jnp.asarray([[True, True], [True, False], [True, True]]),
                         jnp.asarray([[0.0], [1.0], [jnp.nan]]))
    np.testing.assert_array_equal(stats["nonconverged"], [0, 1, 1])  # unconverged channel; NaN output
    np.testing.assert_array_equal(stats["solves"], [1, 1, 1])
    np.testing.assert_array_equal(no_solves(2)["solves"], [0, 0])

    config = smoke("rawks")
    config.rawks.layer.max_iters, config.rawks.layer.tol = 1, 1e-30  # 30 refinements of 1 CG step each: not enough
    model = build_model(config, 3, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    scribbles = np.full((2, 16, 16), -1, np.int32)
    scribbles[:, 2, 2], scribbles[:, 12, 12] = 0, 1
    _, info = jax.jit(lambda m, x, s: m.propagate(x, s, return_info=True))(model, images, scribbles)
    np.testing.assert_array_equal(info["solves"], [1, 1])
    np.testing.assert_array_equal(info["nonconverged"], [1, 1])
    scores, info = model.predict(images, return_info=True)
    np.testing.assert_allclose(scores, model.predict(images), rtol=1e-6)
    np.testing.assert_array_equal(info["solves"], [0, 0])


def test_dilated_colour_term_compares_the_image():
    """dilated.layer.colour_sigma_init: the model's affinity logits (training's focal loss and the
    propagation at test time) are the head's minus the image's scaled colour distances, and the
    loss trains the colour scale."""
    from rwseg.layers.colour import scaled_colour_distances
    from rwseg.stencil import dilated_offsets

    config = smoke("dilated")
    config.dilated.layer.colour_sigma_init = 0.5
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 16, 24, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, size=(2, 16, 24)), jnp.int32)
    cls = model_class("dilated")
    model = build_model(config, 3, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")),
                        statistics=cls.dataset_statistics(config, np.asarray(labels)))
    layer, out = model.refinement, model.backbone(images)
    grid = model.backbone.grid((16, 24))
    aff = layer.affinity_logits(images, *model._head_inputs(images, out), features_grid=grid)
    head = layer.affinity_head.bias[...]  # the head's kernel starts at 0
    want = head - scaled_colour_distances(images, layer.colour_scale[...], dilated_offsets(layer.rates))
    np.testing.assert_allclose(aff, want, rtol=1e-5, atol=1e-5)
    grads = nnx.grad(lambda m: m.loss({"image": images, "label": labels}, 0)[0])(model)
    assert float(jnp.abs(grads.refinement.colour_scale[...]).min()) > 0


def test_dilated_refined_weight_adds_the_propagated_predictions_cross_entropy():
    """dilated.refined_weight: the loss adds that weight x the cross-entropy of the propagated
    prediction (what ``predict`` returns), written out here as numpy's -log p[label]; with the
    paper's focal loss off (beta 0) it alone trains the head and the colour scale, through the
    propagation. probability_cross_entropy of softmax(logits) is cross_entropy of the logits."""
    from rwseg.models.common import probability_cross_entropy

    config = smoke("dilated")
    config.dilated.layer.colour_sigma_init = 0.5
    config.dilated.beta, config.dilated.refined_weight = 0.0, 0.7
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 16, 24, 3)), jnp.float32)
    labels_np = rng.integers(0, 3, size=(2, 16, 24))
    labels_np[0, :3] = 255
    labels = jnp.asarray(labels_np, jnp.int32)
    cls = model_class("dilated")
    model = build_model(config, 3, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")),
                        statistics=cls.dataset_statistics(config, labels_np))
    batch = {"image": images, "label": labels}
    total, logs = model.loss(batch, 0)
    probs = np.asarray(model.predict(images), np.float64)
    b, i, j = np.nonzero(labels_np != 255)
    want = -np.mean(np.log(probs[b, i, j, labels_np[b, i, j]]))
    np.testing.assert_allclose(logs["ce_refined"], want, rtol=1e-5)
    np.testing.assert_allclose(total, logs["ce"] + 0.7 * want, rtol=1e-5)
    grads = nnx.grad(lambda m: m.loss(batch, 0)[0])(model)
    assert float(jnp.abs(grads.refinement.colour_scale[...]).min()) > 0
    assert float(jnp.abs(grads.refinement.affinity_head.kernel[...]).max()) > 0
    config.dilated.refined_weight = 0.0  # the paper's loss: no propagation in training
    paper = build_model(config, 3, rngs=nnx.Rngs(0), statistics=cls.dataset_statistics(config, labels_np))
    assert "ce_refined" not in paper.loss(batch, 0)[1]
    logits = jnp.asarray(3 * rng.normal(size=(2, 4, 5, 6)), jnp.float32)
    small = jnp.asarray(rng.integers(0, 6, size=(2, 4, 5)), jnp.int32)
    np.testing.assert_allclose(probability_cross_entropy(jax.nn.softmax(logits), small),
                               cross_entropy(logits, small), rtol=1e-5)
    wrong = jax.nn.one_hot((small + 1) % 6, 6)  # no probability on any label: large, not infinite
    assert 50 < float(probability_cross_entropy(wrong, small)) < np.inf


def test_spn_guidance_input_sees_the_backbone_features():
    """spn.guidance_input: "image" feeds the guidance network the image itself (the paper);
    "image,stem,features" concatenates the backbone's stem and upsampled decoder features,
    so the gates then depend on the decoder (and on nothing of it with the image alone)."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 16, 24, 3)), jnp.float32)

    def gates_and_shift(spec):
        config = smoke("spn")
        config.spn.guidance_input = spec
        model = build_model(config, 3, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
        out = model.backbone(images)
        g = model.guidance(images, out)
        gates = model.refinement.guidance_gates(g)
        kernel = model.backbone.project.conv.kernel
        kernel[...] = kernel[...] + 0.5  # change the decoder features only
        shifted = model.refinement.guidance_gates(model.guidance(images, model.backbone(images)))
        return model, g, gates, shifted

    model, g, gates, shifted = gates_and_shift("image")
    np.testing.assert_array_equal(g, images)
    np.testing.assert_array_equal(gates, shifted)
    model, g, gates, shifted = gates_and_shift("image,stem,features")
    b = model.backbone
    assert g.shape == (2, 16, 24, 3 + b.stem_channels + b.num_features)
    np.testing.assert_array_equal(g[..., :3], images)
    assert float(jnp.max(jnp.abs(gates - shifted))) > 0
    refined, coarse = model.refine(images)
    assert refined.shape == coarse.shape == (2, 16, 24, 3) and bool(jnp.all(jnp.isfinite(refined)))
    # spn.layer.colour_sigma_init: the colour-kernel term compares the RGB image, whatever the guidance sees
    config = smoke("spn")
    config.spn.guidance_input, config.spn.layer.colour_sigma_init = "image,stem,features", 0.5
    model = build_model(config, 3, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    refined, _ = model.refine(images)
    g = model.guidance(images, model.backbone(images))
    np.testing.assert_array_equal(refined, model.refinement(model.backbone(images)["logits"], g, colour=images,
                                                            logits_grid=model.backbone.grid((16, 24))))
    for bad in ("rgb", "image,image", ""):
        config = smoke("spn")
        config.spn.guidance_input = bad
        with pytest.raises(ValueError, match="spn.guidance_input: expected distinct comma-separated names"):
            build_model(config, 3, rngs=nnx.Rngs(0))
