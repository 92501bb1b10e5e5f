"""Models: backbone shapes, shared losses/helpers against numpy oracles, the registry, and
every method's config training a few steps on the built-in data with a decreasing loss."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rwseg.models import METHODS, build_model, model_class
from rwseg.models.backbone import Backbone
from rwseg.models.common import avg_pool, cross_entropy, subsample_labels, subsample_scribbles
from rwseg.train.config_files import load_config_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"


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


def test_resampling_helpers():
    x = np.arange(2 * 4 * 6 * 3, dtype=np.float64).reshape(2, 4, 6, 3)
    expected = x.reshape(2, 2, 2, 3, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(avg_pool(jnp.asarray(x), 2), expected)
    labels = np.arange(16).reshape(1, 4, 4)
    np.testing.assert_array_equal(subsample_labels(jnp.asarray(labels), 2), labels[:, 1::2, 1::2])
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
