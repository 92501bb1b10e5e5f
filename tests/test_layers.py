"""rwseg.layers: the README example runs; each layer against its operators called directly,
independent properties (identity gates = jax.image.resize, constants preserved by the walk,
no coupling = the unary), shapes/dtypes, jit/vmap/grad composition, diagnostics, and bad
inputs named in the error."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rwseg import dilated, gcrf, rawks, rwn, spn
from rwseg.layers.grid import to_working_grid
from rwseg.layers import (DilatedAffinity, GaussianCRF, RandomWalkLabelPropagation, RandomWalkRefinement,
                          RefinementInfo, SpatialPropagation)

ROOT = pathlib.Path(__file__).resolve().parents[1]
B, H, W, K = 2, 16, 16, 3
RATES = (1, 2)


def _rngs():
    return nnx.Rngs(jax.random.key(0, impl="rbg"))


def _data(seed=0, hw=(H, W)):
    rng = np.random.default_rng(seed)
    image = jnp.asarray(rng.normal(size=(B, *hw, 3)), jnp.float32)
    labels = rng.integers(0, K, size=(B, *hw)).astype(np.int32)
    labels[:, :4, :4] = 0  # some agreeing neighbourhoods for the affinity losses
    labels[0, -1, -1] = 255
    return image, jnp.asarray(labels)


def _frequencies():
    return DilatedAffinity.frequencies_from_labels(np.asarray(_data()[1]), RATES)


def _jit(fn, *args, **kw):
    """fn(*args, **kw) under one jax.jit (eager NNX calls and operators compile op by op: slow)."""
    return jax.jit(lambda *a: fn(*a, **kw))(*args)


def _make(name, **kw):
    """The layer ``name`` with small settings (built eagerly: a few small convs)."""
    if name == "spn":
        return SpatialPropagation(K, guidance_channels=4, guidance_depth=1, rngs=_rngs(), **kw)
    if name == "rwn":
        kw = {"alpha": 0.8, **kw}
        return RandomWalkRefinement(K, feature_channels=2, train_radius=2, eval_radius=1, rngs=_rngs(), **kw)
    if name == "gcrf":
        kw = {"downsample": 2, **kw}
        return GaussianCRF(K, feature_channels=2, embedding_channels=4, radius=1, num_steps=3, rngs=_rngs(), **kw)
    if name == "dilated":
        return DilatedAffinity(K, 2, rates=RATES, frequencies=_frequencies(), rngs=_rngs(), **kw)
    kw = {"downsample": 2, **kw}
    return RandomWalkLabelPropagation(K, boundary_channels=4, boundary_depth=1, rngs=_rngs(), **kw)


def _scribbles(labels):
    s = np.full(labels.shape, -1, np.int32)
    s[:, 2, 2], s[:, 12, 12], s[:, 2, 12] = 0, 1, 2
    return jnp.asarray(s)


# ----------------------------------------------------------------------------- README


def test_readme_example_runs_and_trains():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Refinement layers for your own network", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    first = float(ns["loss"])
    assert np.isfinite(first) and first > 0
    model, optimizer, step = ns["model"], ns["optimizer"], ns["train_step"]
    out = model(ns["image"])
    assert out.shape == (2, 32, 32, 4)
    losses = [float(step(model, optimizer, ns["image"], ns["label"])) for _ in range(3)]
    assert losses[-1] < first, (first, losses)  # the step trained the network and the layer


# ----------------------------------------------------------------------------- against the operators


def test_spatial_propagation_is_the_spn_operator_on_guidance_gates():
    layer = _make("spn")
    image, _ = _data()
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(B, H, W, K)), jnp.float32)
    got, info = _jit(layer, logits, image, return_info=True)
    gates = _jit(layer.guidance_gates, image)
    assert gates.shape == (B, 4, H, W, K, 3)
    assert bool(jnp.all(jnp.sum(jnp.abs(gates), -1) <= 1 + 1e-6))  # Theorem 3
    want = _jit(jax.vmap(spn.spn), logits, gates)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert got.dtype == jnp.float32 and got.shape == (B, H, W, K)
    assert isinstance(info, RefinementInfo)
    np.testing.assert_array_equal(info.solves, [0, 0])
    np.testing.assert_array_equal(info.iterations, [1, 1])


def test_spatial_propagation_with_zero_gates_is_bilinear_resize():
    """Independent oracle for the resampling of low-resolution logits: with every gate 0 the
    propagation is the identity, so the layer is jax.image.resize of the (aligned) logits."""
    layer = _make("spn")
    layer.gates.kernel[...] = jnp.zeros_like(layer.gates.kernel[...])
    layer.gates.bias[...] = jnp.zeros_like(layer.gates.bias[...])
    image, _ = _data()
    low = jnp.asarray(np.random.default_rng(2).normal(size=(B, 4, 8, K)), jnp.float32)
    got = _jit(layer, low, image)
    want = jax.image.resize(low, (B, H, W, K), "bilinear")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_spatial_propagation_colour_start_is_the_colour_kernel():
    """colour_sigma_init = sigma, colour_gate_init = lam: with the guidance network's gates at 0,
    gate k of each direction is (lam / 3) exp(-|I_i - I_k|^2 / (2 sigma^2)) of the 2x2-pooled colour
    and the neighbour that direction reads (written out here pixel by pixel, not from
    rwseg.spn.direction_offsets), 0 outside the image; a guidance map without the colour argument
    is refused, and the layer without the term ignores the colour."""
    sigma, lam, f = 0.7, 0.9, 2
    layer = _make("spn", downsample=f, colour_sigma_init=sigma, colour_gate_init=lam)
    layer.gates.kernel[...] = jnp.zeros_like(layer.gates.kernel[...])
    layer.gates.bias[...] = jnp.zeros_like(layer.gates.bias[...])
    image, _ = _data()
    colour = np.random.default_rng(5).normal(size=(B, H, W, 3)).astype(np.float32)
    got = np.asarray(_jit(layer.guidance_gates, image, jnp.asarray(colour)))
    assert got.shape == (B, 4, H // f, W // f, K, 3)
    pooled = colour.reshape(B, H // f, f, W // f, f, 3).mean((2, 4))
    h, w = H // f, W // f
    # the neighbour (row, col) gate k = 0, 1, 2 of pixel (i, j) reads, per direction in spn.DIRECTIONS order
    reads = (lambda i, j, k: (i + k - 1, j - 1), lambda i, j, k: (i + k - 1, j + 1),
             lambda i, j, k: (i - 1, j + k - 1), lambda i, j, k: (i + 1, j + k - 1))
    want = np.zeros((B, 4, h, w, 3))
    for d, read in enumerate(reads):
        for i in range(h):
            for j in range(w):
                for k in range(3):
                    y, x = read(i, j, k)
                    if 0 <= y < h and 0 <= x < w:
                        dist = np.sum((pooled[:, i, j] - pooled[:, y, x]) ** 2, -1)
                        want[:, d, i, j, k] = lam / 3 * np.exp(-dist / (2 * sigma ** 2))
    np.testing.assert_allclose(got, np.broadcast_to(want[:, :, :, :, None, :], got.shape), rtol=1e-5, atol=1e-6)
    assert np.sum(got, -1).max() <= lam + 1e-6  # a constant colour gives lam, below Theorem 3's bound
    logits = jnp.asarray(np.random.default_rng(6).normal(size=(B, H, W, K)), jnp.float32)
    refined = _jit(lambda lg, im, c: layer(lg, im, colour=c), logits, image, jnp.asarray(colour))
    want_out = jax.vmap(spn.spn)(to_working_grid(logits, (H, W), f), jnp.asarray(got))
    np.testing.assert_allclose(refined, jax.image.resize(want_out, (B, H, W, K), "bilinear"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="colour: expected the .* colour_sigma_init > 0"):
        layer(logits, image)
    with pytest.raises(ValueError, match=r"colour: expected shape \(2, 16, 16, 3\)"):
        layer(logits, image, colour=jnp.asarray(colour[:1]))
    plain = _make("spn")
    np.testing.assert_array_equal(_jit(plain, logits, image), _jit(lambda *a: plain(*a[:2], colour=a[2]), logits,
                                                                   image, jnp.asarray(colour)))
    assert not hasattr(plain, "colour_scale")
    for kw, match in (({"colour_sigma_init": -1.0}, "colour_sigma_init: expected 0"),
                      ({"colour_sigma_init": float("nan")}, "colour_sigma_init: expected 0"),
                      ({"colour_gate_init": 0.0}, r"colour_gate_init: expected a value in \(0, 1\]"),
                      ({"colour_gate_init": 1.5}, r"colour_gate_init: expected a value in \(0, 1\]")):
        with pytest.raises(ValueError, match=match):
            _make("spn", **kw)


def test_random_walk_theta_init_splits_image_and_feature_channels():
    """theta_init weights the image channels' distances, feature_theta_init the features': with
    the features' weight 0 the affinities are the colour kernel exp(theta_init * L1 colour distance)."""
    layer = RandomWalkRefinement(K, feature_channels=2, theta_init=-2.5, feature_theta_init=0.0, eval_radius=1)
    np.testing.assert_array_equal(np.asarray(layer.theta[...]), [-2.5, -2.5, -2.5, 0.0, 0.0])
    image, _ = _data()
    feats = jnp.asarray(np.random.default_rng(4).normal(size=(B, H, W, 2)), jnp.float32)
    offsets = layer.eval_offsets
    colour = jax.vmap(lambda x: rwn.affinity(rwn.feature_distances(x, offsets), jnp.full((3,), -2.5), offsets))
    np.testing.assert_allclose(_jit(layer.affinities, image, feats), _jit(colour, image), rtol=1e-6)


def test_gaussian_crf_colour_sigma_init_starts_at_the_colour_kernel():
    """colour_sigma_init = sigma: the similarity on the GMF grid is exp(-|I_i - I_j|^2 / (2 sigma^2))
    of the average-pooled image (numpy oracle), whatever the features; 0 keeps the random start."""
    sigma, f = 0.3, 2
    layer = GaussianCRF(K, feature_channels=f, radius=1, downsample=2, colour_sigma_init=sigma, rngs=nnx.Rngs(0))
    image, _ = _data()
    feats = jnp.asarray(np.random.default_rng(5).normal(size=(B, H // 2, W // 2, f)), jnp.float32)
    got = np.asarray(_jit(layer.similarity, image, feats))
    small = np.asarray(image, np.float64).reshape(B, H // 2, 2, W // 2, 2, 3).mean(axis=(2, 4))
    h, w = small.shape[1:3]
    want = np.zeros(got.shape)
    for n, (dy, dx) in enumerate(layer.offsets):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    d2 = np.sum((small[:, y, x] - small[:, y + dy, x + dx]) ** 2, axis=-1)
                    want[:, y, x, n] = np.exp(-d2 / (2 * sigma ** 2))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    random = GaussianCRF(K, feature_channels=f, radius=1, downsample=2, rngs=nnx.Rngs(0))
    assert np.max(np.abs(np.asarray(_jit(random.similarity, image, feats)) - want)) > 1e-2
    with pytest.raises(ValueError, match="num_filters: colour_sigma_init needs at least the image's 3 channels"):
        GaussianCRF(K, num_filters=2, colour_sigma_init=sigma, rngs=nnx.Rngs(0))
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="colour_sigma_init: expected 0 .* or a positive width"):
            GaussianCRF(K, colour_sigma_init=bad, rngs=nnx.Rngs(0))


def test_random_walk_refinement_is_the_rwn_operator():
    layer = _make("rwn")
    image, labels = _data()
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(B, H, W, K)), jnp.float32)
    feats = jnp.asarray(rng.normal(size=(B, H, W, 2)), jnp.float32)
    theta = layer.theta[...]
    x = jnp.concatenate([image, feats], -1)
    for train, offsets in ((True, layer.train_offsets), (False, layer.eval_offsets)):
        weights = _jit(jax.vmap(lambda xx: rwn.affinity(rwn.feature_distances(xx, offsets), theta, offsets)), x)
        np.testing.assert_allclose(_jit(layer.affinities, image, feats, train=train), weights, rtol=1e-6)
        if train:
            walk = lambda w, f: rwn.random_walk(w, f, offsets, alpha=1.0, num_steps=1)
            want_loss = np.mean([rwn.affinity_loss(w, l, offsets) for w, l in zip(np.asarray(weights), labels)])
        else:
            walk = lambda w, f: rwn.random_walk(w, f, offsets, alpha=0.8, symmetric=True, tol=1e-5, max_iters=200)
        want = _jit(jax.vmap(walk), weights, logits)
        got = _jit(layer, logits, image, feats, train=train, affinities=weights if train else None)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_jit(layer.affinity_loss, image, labels, feats), want_loss, rtol=1e-6)


def test_random_walk_eval_rates_add_rings_to_the_test_disk():
    """eval_rates: the test-time stencil is the disk plus the 8 neighbours at each rate (rings that
    coincide with disk offsets are not doubled); the converged walk on it equals a dense numpy solve
    of eq. 3, (1 - alpha)(I - alpha D^-1 W)^-1 f, with W built pair by pair from the colour kernel."""
    alpha, theta = 0.8, -1.5
    layer = RandomWalkRefinement(K, eval_radius=1, eval_rates=(1, 3), alpha=alpha, theta_init=theta, tol=1e-7)
    disk = {(-1, 0), (0, -1), (0, 1), (1, 0)}
    assert set(layer.eval_offsets) == disk | {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                                              if (dy, dx) != (0, 0)} | {(3 * dy, 3 * dx) for dy in (-1, 0, 1)
                                                                         for dx in (-1, 0, 1) if (dy, dx) != (0, 0)}
    assert len(layer.eval_offsets) == len(set(layer.eval_offsets)) == 4 + 4 + 8
    assert RandomWalkRefinement(K, eval_radius=2).eval_offsets == RandomWalkRefinement(K, eval_radius=2,
                                                                                          eval_rates=()).eval_offsets
    image, _ = _data(hw=(8, 8))
    logits = np.random.default_rng(6).normal(size=(B, 8, 8, K))
    got = np.asarray(_jit(layer, jnp.asarray(logits, jnp.float32), image))
    np.testing.assert_allclose(got, _dense_walk(layer, image, theta, alpha, logits), rtol=1e-4, atol=1e-4)


def _dense_walk(layer, image, theta, alpha, f):
    """Eq. 3 by a dense numpy solve on the layer's test-time stencil (full resolution):
    (1 - alpha)(I - alpha D^-1 W)^-1 f, W built pair by pair from the colour kernel
    exp(theta * sum_c |I_i - I_j|)."""
    x = np.asarray(image, np.float64)
    b_, h, w, k = f.shape
    n = h * w
    out = np.zeros(f.shape)
    for b in range(b_):
        wmat = np.zeros((n, n))
        for i in range(n):
            for dy, dx in layer.eval_offsets:
                y, xx = divmod(i, w)
                if 0 <= y + dy < h and 0 <= xx + dx < w:
                    j = (y + dy) * w + xx + dx
                    wmat[i, j] = np.exp(theta * np.abs(x[b, y, xx] - x[b, y + dy, xx + dx]).sum())
        a = wmat / wmat.sum(1, keepdims=True)
        out[b] = ((1 - alpha) * np.linalg.solve(np.eye(n) - alpha * a, f[b].reshape(n, k))).reshape(h, w, k)
    return out


def test_random_walk_on_probabilities_walks_the_softmax():
    """walk_on="probabilities": the log of eq. 3's converged walk applied to softmax(logits)
    (dense numpy oracle); every pixel's walked scores are then a distribution (logsumexp 0)."""
    alpha, theta = 0.8, -1.5
    layer = RandomWalkRefinement(K, eval_radius=1, alpha=alpha, theta_init=theta, tol=1e-7, walk_on="probabilities")
    image, _ = _data(hw=(8, 8))
    logits = 3 * np.random.default_rng(7).normal(size=(B, 8, 8, K))
    got = np.asarray(_jit(layer, jnp.asarray(logits, jnp.float32), image))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.log(_dense_walk(layer, image, theta, alpha, p / p.sum(-1, keepdims=True)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.log(np.exp(got).sum(-1)), 0, atol=1e-5)
    one_step = np.asarray(_jit(lambda f, im: layer(f, im, train=True), jnp.asarray(logits, jnp.float32), image))
    np.testing.assert_allclose(np.exp(one_step).sum(-1), 1, atol=1e-5)  # the training walk (eq. 2) too
    with pytest.raises(ValueError, match="walk_on: expected one of"):
        RandomWalkRefinement(K, walk_on="scores")


def test_random_walk_preserves_constant_scores():
    """The converged walk (1 - alpha)(I - alpha A)^-1 of a row-stochastic A maps constants to themselves
    (a property of eq. 3, independent of the implementation), here through the walk grid and back."""
    layer = _make("rwn", downsample=2)
    image, _ = _data()
    logits = jnp.broadcast_to(jnp.asarray([0.3, -1.0, 2.0], jnp.float32), (B, 4, 4, K))
    y, info = _jit(layer, logits, image, jnp.ones((B, H, W, 2), jnp.float32), return_info=True)
    np.testing.assert_allclose(y, jnp.broadcast_to(logits[:, :1, :1], (B, H, W, K)), atol=1e-4)
    np.testing.assert_array_equal(info.solves, [1, 1])
    np.testing.assert_array_equal(info.nonconverged, [0, 0])
    assert bool(jnp.all(info.iterations > 0)) and bool(jnp.all(info.residual <= 1e-5))


def test_gaussian_crf_is_gmf_on_the_similarity():
    layer = _make("gcrf")
    image, labels = _data()
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(size=(B, 8, 8, K)), jnp.float32)  # at the CRF grid (downsample 2)
    feats = jnp.asarray(rng.normal(size=(B, 8, 8, 2)), jnp.float32)
    small = image.reshape(B, 8, 2, 8, 2, 3).mean((2, 4))
    z = layer.pairwise(jnp.concatenate([feats, small], -1))
    sim = jax.vmap(lambda zz: gcrf.pairwise_similarity(zz, layer.filters[...], layer.offsets))(z)
    np.testing.assert_allclose(_jit(layer.similarity, image, feats), sim, rtol=1e-6)
    compat = gcrf.compatibility(layer.compat[...])
    unary = jax.nn.softmax(logits, -1)
    y_small = _jit(jax.vmap(lambda r, s: gcrf.gmf(r, s, compat, layer.offsets, num_steps=3)), unary, sim)
    want = jax.image.resize(y_small, (B, H, W, K), "bilinear")  # pooled grid of factor 2 = aligned
    np.testing.assert_allclose(_jit(layer, logits, image, feats, train=True, similarity=sim), want, rtol=1e-5,
                               atol=1e-6)
    y, info = _jit(layer, logits, image, feats, return_info=True)
    np.testing.assert_array_equal(info.nonconverged, [0, 0])
    assert y.shape == (B, H, W, K)
    margin = np.mean([gcrf.margin_loss(yy, ll, margin=0.5) for yy, ll in zip(y, labels)])
    np.testing.assert_allclose(_jit(layer.margin_loss, y, labels), margin, rtol=1e-6)
    small_labels = jnp.asarray(labels).reshape(B, 8, 2, 8, 2)  # block majority (ties: smallest label)
    counts = jax.nn.one_hot(jnp.where(small_labels < K, small_labels, K), K + 1).sum((2, 4))[..., :K]
    majority = jnp.where(counts.max(-1) > 0, jnp.argmax(counts, -1), 255)
    pre = np.mean([gcrf.similarity_pretrain_loss(ss, ll, layer.offsets) for ss, ll in zip(sim, majority)])
    np.testing.assert_allclose(_jit(layer.pretrain_loss, image, labels, feats), pre, rtol=1e-5)


def test_gaussian_crf_test_time_grid_and_window():
    """eval_downsample / eval_radius (issue 26: a wider reach at test time): training is the
    layer's own grid and window; at test time the same parameters are solved on the other ones,
    i.e. the layer is the one built with those as its downsample and radius."""
    kw = dict(feature_channels=2, embedding_channels=4, num_steps=3, rngs=_rngs())
    layer = GaussianCRF(K, radius=1, downsample=4, eval_radius=3, eval_downsample=2, **kw)
    as_trained = GaussianCRF(K, radius=1, downsample=4, **{**kw, "rngs": _rngs()})
    as_tested = GaussianCRF(K, radius=3, downsample=2, **{**kw, "rngs": _rngs()})
    for other in (as_trained, as_tested):
        nnx.update(other, nnx.state(layer, nnx.Param))
    image, labels = _data()
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(B, H, W, K)), jnp.float32)
    feats = jnp.asarray(rng.normal(size=(B, 8, 8, 2)), jnp.float32)
    assert _jit(layer.similarity, image, feats, train=True).shape == (B, 4, 4, len(layer.offsets))
    assert _jit(layer.similarity, image, feats).shape == (B, 8, 8, len(layer.eval_offsets))
    assert len(layer.eval_offsets) > len(layer.offsets)
    np.testing.assert_allclose(_jit(layer, logits, image, feats, train=True),
                               _jit(as_trained, logits, image, feats, train=True), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_jit(layer.pretrain_loss, image, labels, feats),
                               _jit(as_trained.pretrain_loss, image, labels, feats), rtol=1e-6)
    y, info = _jit(layer, logits, image, feats, return_info=True)
    np.testing.assert_array_equal(info.nonconverged, [0, 0])
    np.testing.assert_allclose(y, _jit(as_tested, logits, image, feats), rtol=1e-6, atol=1e-7)
    assert float(jnp.max(jnp.abs(y - _jit(as_trained, logits, image, feats)))) > 1e-3  # a different solve
    with pytest.raises(ValueError, match="downsample"):
        GaussianCRF(K, radius=1, downsample=4, eval_downsample=3, **{**kw, "rngs": _rngs()})(logits, image, feats)


def test_gaussian_crf_without_coupling_returns_the_unary():
    """C = 0 decouples the pixels: GMF's fixed point is r = softmax(logits) (eq. 2)."""
    layer = _make("gcrf", compat_init=0.0)
    image, _ = _data()
    logits = jnp.asarray(np.random.default_rng(5).normal(size=(B, 8, 8, K)), jnp.float32)
    feats = jnp.zeros((B, 8, 8, 2), jnp.float32)
    want = jax.image.resize(jax.nn.softmax(logits, -1), (B, H, W, K), "bilinear")
    np.testing.assert_allclose(_jit(layer, logits, image, feats), want, atol=1e-6)


def test_dilated_affinity_is_propagate_of_the_head():
    layer = _make("dilated", low_level_channels=1)
    image, labels = _data()
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.normal(size=(B, 4, 4, K)), jnp.float32)
    feats = jnp.asarray(rng.normal(size=(B, 4, 4, 2)), jnp.float32)
    low = jnp.asarray(rng.normal(size=(B, H, W, 1)), jnp.float32)
    aff = layer.affinity_head(jnp.concatenate([jax.image.resize(feats, (B, H, W, 2), "bilinear"), low], -1))
    np.testing.assert_allclose(_jit(layer.affinity_logits, image, feats, low), aff, rtol=1e-5, atol=1e-5)
    probs = jax.nn.softmax(jax.image.resize(logits, (B, H, W, K), "bilinear"), -1)
    propagate = jax.vmap(lambda p, a: dilated.propagate(p, a, RATES, lam=6.0, mu=7.0, num_steps=10))

    def focal(affs):  # the operator's loss per image, averaged over the batch
        return np.mean([dilated.affinity_loss(a, l, RATES, layer.frequencies[...], gamma=2.0)
                        for a, l in zip(affs, labels)])

    got, info = _jit(layer, logits, image, feats, low, return_info=True)
    np.testing.assert_allclose(got, _jit(propagate, probs, aff), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.sum(got, -1), 1, rtol=1e-5)
    np.testing.assert_array_equal(info.iterations, [10, 10])
    np.testing.assert_allclose(_jit(layer.affinity_loss, image, labels, feats, low), focal(aff), rtol=1e-5)
    # affinities= (a training step's logits, computed once) replaces the head in both
    other = aff + jnp.asarray(rng.normal(size=aff.shape), jnp.float32)
    np.testing.assert_allclose(_jit(lambda *a: layer(*a, affinities=other), logits, image, feats, low),
                               _jit(propagate, probs, other), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_jit(lambda *a: layer.affinity_loss(*a, affinities=other), image, labels, feats,
                                    low), focal(other), rtol=1e-5)
    # the head's bias starts at the dataset prior (sigmoid(b_r) = pi_r)
    np.testing.assert_allclose(layer.affinity_head.bias[...],
                               np.repeat(dilated.prior_bias(jnp.asarray(_frequencies())), 8), rtol=1e-6)


def test_dilated_affinity_colour_start_is_the_log_colour_kernel():
    """colour_sigma_init = sigma: at the start the head's kernel is 0 and the logit of pixel i's
    neighbour at offset (dy, dx) is the prior bias b_r minus |I_i - I_(i + (dy, dx))|^2 / (2 sigma^2)
    (written out here pixel by pixel, offsets row-major per rate, not from rwseg.stencil; the
    bias alone where the neighbour is outside); the layer propagates those logits, the affinity loss
    trains the colour scale, and the term needs a 3-channel image."""
    sigma = 0.8
    layer = _make("dilated", low_level_channels=1, colour_sigma_init=sigma)
    np.testing.assert_array_equal(layer.affinity_head.kernel[...], 0)
    image, labels = _data()
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.normal(size=(B, 4, 4, K)), jnp.float32)
    feats = jnp.asarray(rng.normal(size=(B, 4, 4, 2)), jnp.float32)
    low = jnp.asarray(rng.normal(size=(B, H, W, 1)), jnp.float32)
    got = np.asarray(_jit(layer.affinity_logits, image, feats, low))
    colour, bias = np.asarray(image), np.asarray(dilated.prior_bias(jnp.asarray(_frequencies())))
    offsets = [(dy, dx) for r in RATES for dy in (-r, 0, r) for dx in (-r, 0, r) if (dy, dx) != (0, 0)]
    want = np.zeros((B, H, W, len(offsets)))
    for c, (dy, dx) in enumerate(offsets):
        want[..., c] = bias[c // 8]
        for i in range(H):
            for j in range(W):
                if 0 <= i + dy < H and 0 <= j + dx < W:
                    dist = np.sum((colour[:, i, j] - colour[:, i + dy, j + dx]) ** 2, -1)
                    want[:, i, j, c] -= dist / (2 * sigma ** 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    probs = jax.nn.softmax(jax.image.resize(logits, (B, H, W, K), "bilinear"), -1)
    want_out = _jit(jax.vmap(lambda p, a: dilated.propagate(p, a, RATES, lam=6.0, mu=7.0, num_steps=10)), probs,
                    jnp.asarray(got))
    np.testing.assert_allclose(_jit(layer, logits, image, feats, low), want_out, rtol=1e-5, atol=1e-6)
    grads = nnx.grad(lambda m: m.affinity_loss(image, labels, feats, low))(layer)
    assert float(jnp.abs(grads.colour_scale[...]).min()) > 0
    with pytest.raises(ValueError, match=r"image: expected shape \(B, H, W, 3\)"):
        layer.affinity_logits(jnp.zeros((B, H, W, 4)), feats, low)
    plain = _make("dilated")
    assert not hasattr(plain, "colour_scale")
    assert plain.affinity_logits(jnp.zeros((B, H, W, 4)), feats).shape == (B, H, W, 8 * len(RATES))
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="colour_sigma_init: expected 0 .* or a positive width"):
            _make("dilated", colour_sigma_init=bad)


def test_dilated_affinity_decoder_feeds_the_head():
    """decoder_depth 3x3 blocks sit between the (concatenated) features and the 1x1 head, at
    image resolution with low-level features and at the features' resolution without."""
    from rwseg.layers.convs import apply_stack

    image, _ = _data()
    rng = np.random.default_rng(7)
    feats = jnp.asarray(rng.normal(size=(B, 4, 4, 2)), jnp.float32)
    low = jnp.asarray(rng.normal(size=(B, H, W, 1)), jnp.float32)
    layer = _make("dilated", low_level_channels=1, decoder_width=8, decoder_depth=2)
    assert len(layer.decoder) == 2 and layer.affinity_head.kernel.shape == (1, 1, 8, 8 * len(RATES))
    x = jnp.concatenate([jax.image.resize(feats, (B, H, W, 2), "bilinear"), low], -1)
    want = layer.affinity_head(apply_stack(layer.decoder, x))
    np.testing.assert_allclose(_jit(layer.affinity_logits, image, feats, low), want, rtol=1e-5, atol=1e-5)
    coarse = _make("dilated", decoder_width=4, decoder_depth=1)
    want = jax.image.resize(coarse.affinity_head(apply_stack(coarse.decoder, feats)), (B, H, W, 8 * len(RATES)),
                            "bilinear")
    np.testing.assert_allclose(_jit(coarse.affinity_logits, image, feats), want, rtol=1e-5, atol=1e-5)
    # the decoder trains with the head: the affinity loss has gradients in its convolutions
    _, labels = _data()
    grads = nnx.grad(lambda m: m.affinity_loss(image, labels, feats, low))(layer)
    assert float(jnp.abs(grads.decoder[0].conv.kernel[...]).max()) > 0
    with pytest.raises(ValueError, match="decoder_depth, decoder_width: expected depth 0, or depth >= 1 with width"):
        _make("dilated", decoder_depth=1)


def test_label_propagation_is_hitting_probabilities_and_eq11():
    layer = _make("rawks")
    image, labels = _data()
    scribbles = _scribbles(labels)
    boundary = _jit(layer.boundary, image)
    assert boundary.shape == (B, 8, 8) and bool(jnp.all(boundary >= 0))
    seeds = scribbles.reshape(B, 8, 2, 8, 2).max((2, 4))
    logits = jnp.asarray(np.random.default_rng(7).normal(size=(B, 8, 8, K)), jnp.float32)

    def run(b, s, lg):  # one compilation (the refined solve is the slow part to compile)
        want = jax.vmap(lambda bb, ss: rawks.hitting_probabilities(bb, ss, K, tol=1e-4, max_iters=300))(b, s)
        want_loss = jnp.mean(jax.vmap(lambda pp, q: rawks.rawks_loss(pp, q, temperature=1.0))(want, lg))
        return want, want_loss, layer(image, scribbles, return_info=True), layer.loss(lg, image, scribbles)

    want, want_loss, (p, info), loss = jax.jit(run)(boundary, seeds, logits)
    np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.sum(p, -1), 1, rtol=1e-5)
    np.testing.assert_array_equal(info.nonconverged, [0, 0])
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)


def test_label_propagation_fixed_targets_train_q_alone():
    """``loss(..., fixed_targets=True)`` (the "train P, Q, then Q" stage): the same value, the same
    gradient in the logits, and exactly no gradient into the boundary network."""
    layer = _make("rawks")
    graphdef, state = nnx.split(layer)
    image, labels = _data()
    logits = jnp.asarray(np.random.default_rng(9).normal(size=(B, 8, 8, K)), jnp.float32)

    def run(st, lg):
        f = lambda fixed: lambda s, l: nnx.merge(graphdef, s).loss(l, image, _scribbles(labels), fixed_targets=fixed)
        return [(f(x)(st, lg), jax.grad(f(x), argnums=(0, 1))(st, lg)) for x in (False, True)]

    (joint, (g_joint, gl_joint)), (fixed, (g_fixed, gl_fixed)) = jax.jit(run)(state, logits)
    np.testing.assert_allclose(fixed, joint, rtol=1e-6)
    np.testing.assert_allclose(gl_fixed, gl_joint, rtol=1e-4, atol=1e-7)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_joint)) > 0
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g_fixed))


def test_label_propagation_hard_targets_need_fixed_targets():
    """``targets="hard"`` is rawks_loss(targets="hard") of the layer's own P, and only with
    ``fixed_targets`` (argmax P has no gradient for the boundary network)."""
    layer = _make("rawks")
    image, labels = _data()
    logits = jnp.asarray(np.random.default_rng(9).normal(size=(B, 8, 8, K)), jnp.float32)
    with pytest.raises(ValueError, match=r"targets='hard' needs fixed_targets=True"):
        layer.loss(logits, image, _scribbles(labels), targets="hard")
    got = layer.loss(logits, image, _scribbles(labels), fixed_targets=True, targets="hard")
    p = layer(image, _scribbles(labels))
    q = to_working_grid(logits, image.shape[1:3], layer.downsample, None)
    want = jnp.mean(jax.vmap(lambda pp, qq: rawks.rawks_loss(pp, qq, temperature=layer.temperature,
                                                             targets="hard"))(p, q))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not np.allclose(got, layer.loss(logits, image, _scribbles(labels), fixed_targets=True))


# ----------------------------------------------------------------------------- composition, diagnostics


def _call(name, layer, image, labels, logits, feats):
    if name == "rawks":
        return layer.loss(logits, image, _scribbles(labels))
    if name == "spn":
        return jnp.mean(layer(logits, image) ** 2)
    if name == "dilated":
        return jnp.mean(layer(logits, image, feats) ** 2) + layer.affinity_loss(image, labels, feats)
    return jnp.mean(layer(logits, image, feats) ** 2)


@pytest.mark.parametrize("name", ["spn", "rwn", "gcrf", "dilated", "rawks"])
def test_layers_compose_with_jit_vmap_grad(name):
    """Under jit: vmap over a stack of two batches equals the two calls; the gradient in the layer's
    parameters and in the logits is finite and not all zero."""
    layer = _make(name)
    graphdef, state = nnx.split(layer)
    image, labels = _data()
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.normal(size=(2, B, 8, 8, K)), jnp.float32)
    feats = jnp.asarray(rng.normal(size=(2, B, 8, 8, 2)), jnp.float32)
    f = lambda st, lg, ft: _call(name, nnx.merge(graphdef, st), image, labels, lg, ft)

    def run(st, lg, ft):  # one compilation for all three
        return jax.vmap(f, in_axes=(None, 0, 0))(st, lg, ft), [f(st, lg[i], ft[i]) for i in range(2)], \
            jax.grad(f, argnums=(0, 1))(st, lg[0], ft[0])

    batched, single, (g_state, g_logits) = jax.jit(run)(state, logits, feats)
    np.testing.assert_allclose(batched, single, rtol=2e-5)
    leaves = jax.tree.leaves(nnx.state(nnx.merge(graphdef, g_state), nnx.Param))
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
    assert bool(jnp.all(jnp.isfinite(g_logits))) and float(jnp.max(jnp.abs(g_logits))) > 0


@pytest.mark.parametrize("name", ["rwn", "gcrf"])
def test_one_iteration_is_reported_nonconverged(name):
    layer = _make(name, max_iters=1)
    image, _ = _data()
    logits = jnp.asarray(np.random.default_rng(9).normal(size=(B, 8, 8, K)), jnp.float32)
    feats = jnp.asarray(np.random.default_rng(10).normal(size=(B, 8, 8, 2)), jnp.float32)
    _, info = jax.jit(lambda lg, ft: layer(lg, image, ft, return_info=True))(logits, feats)
    np.testing.assert_array_equal(info.solves, [1, 1])
    np.testing.assert_array_equal(info.nonconverged, [1, 1])
    np.testing.assert_array_equal(info.iterations, [1, 1])


def test_float32_in_float32_out_at_any_logit_resolution():
    image, _ = _data()
    for name in ("spn", "rwn", "gcrf", "dilated"):
        layer = _make(name)
        for hw in ((4, 8), (5, 3)):
            logits = jnp.zeros((B, *hw, K), jnp.float32)
            args = (logits, image) if name == "spn" else (logits, image, jnp.zeros((B, 4, 4, 2), jnp.float32))
            out = _jit(layer, *args)
            assert out.shape == (B, H, W, K) and out.dtype == jnp.float32, (name, hw)
            assert bool(jnp.all(jnp.isfinite(out)))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["spn", "rwn", "gcrf", "dilated"])
def test_bad_inputs_name_the_argument(name):
    layer = _make(name)
    image, _ = _data()
    logits, feats = jnp.zeros((B, 8, 8, K), jnp.float32), jnp.zeros((B, 8, 8, 2), jnp.float32)
    call = (lambda lg, im, ft: layer(lg, im)) if name == "spn" else (lambda lg, im, ft: layer(lg, im, ft))
    with pytest.raises(ValueError, match=r"logits: expected shape \(B, h, w, 3\).*got \(2, 8, 8, 4\)"):
        call(jnp.zeros((B, 8, 8, K + 1), jnp.float32), image, feats)
    with pytest.raises(ValueError, match=r"logits: expected .*B = 2.*got \(1, 8, 8, 3\)"):
        call(jnp.zeros((1, 8, 8, K), jnp.float32), image, feats)
    with pytest.raises(ValueError, match="logits: expected a floating dtype"):
        call(jnp.zeros((B, 8, 8, K), jnp.int32), image, feats)
    with pytest.raises(ValueError, match=r"image: expected shape \(B, H, W"):
        call(logits, image[..., 0], feats)
    if name != "dilated":
        with pytest.raises(ValueError, match=r"image: expected shape \(B, H, W, 3\), got \(2, 16, 16, 4\)"):
            call(logits, jnp.zeros((B, H, W, 4), jnp.float32), feats)
    if name != "spn":
        with pytest.raises(ValueError, match=r"features: expected shape \(B, h, w, 2\)"):
            call(logits, image, jnp.zeros((B, 8, 8, 5), jnp.float32))
    if name in ("rwn", "gcrf"):
        with pytest.raises(ValueError, match="features: expected .*got None"):
            layer(logits, image)


def test_bad_options_and_labels_name_the_argument():
    image, labels = _data()
    with pytest.raises(ValueError, match="image: expected H, W divisible by downsample=3"):
        _make("gcrf", downsample=3)(jnp.zeros((B, 8, 8, K), jnp.float32), image, jnp.zeros((B, 8, 8, 2)))
    with pytest.raises(ValueError, match="merge: expected 'max' or 'mean', got 'min'"):
        _make("spn", merge="min")
    with pytest.raises(ValueError, match=r"alpha: expected a restart probability in \[0, 1\), got 1.0"):
        _make("rwn", alpha=1.0)
    with pytest.raises(ValueError, match=r"frequencies: expected shape \(2, 9\)"):
        DilatedAffinity(K, 2, rates=RATES, frequencies=np.ones((3, 9)), rngs=_rngs())
    with pytest.raises(ValueError, match=r"low_level: expected \(B, H, W, 1\) .*got None"):
        _make("dilated", low_level_channels=1)(jnp.zeros((B, 8, 8, K)), image, jnp.zeros((B, 8, 8, 2)))
    with pytest.raises(ValueError, match=r"affinities: expected the image size \(16, 16\) .*got \(8, 8\)"):
        _make("dilated")(jnp.zeros((B, 8, 8, K)), image, jnp.zeros((B, 8, 8, 2)),
                         affinities=jnp.zeros((B, 8, 8, 8 * len(RATES))))
    with pytest.raises(ValueError, match=r"affinities: expected shape \(B, h, w, 16\) .*8 x len\(rates\)"):
        _make("dilated").affinity_loss(image, labels, jnp.zeros((B, 8, 8, 2)), affinities=jnp.zeros((B, H, W, 3)))
    with pytest.raises(ValueError, match=r"labels: expected shape \(B, H, W\) = \(2, 16, 16\)"):
        _make("rwn").affinity_loss(image, labels[:, :8], jnp.zeros((B, H, W, 2)))
    with pytest.raises(ValueError, match="labels: expected an integer dtype"):
        _make("gcrf").pretrain_loss(image, labels.astype(jnp.float32), jnp.zeros((B, 8, 8, 2)))
    with pytest.raises(ValueError, match=r"scribbles: expected shape \(B, H, W\)"):
        _make("rawks")(image, _scribbles(labels)[:, :8])
