"""experiments.bootstrap.paired_bootstrap against exact and large-sample answers."""

import numpy as np
import pytest

from experiments.bootstrap import paired_bootstrap, resample_weights


def ratio(c):  # summed [value, weight] pairs -> weighted mean, batched over the leading axis
    return c["v"][:, 0] / c["v"][:, 1]


def test_resample_weights_draw_n_items():
    w = resample_weights(7, 50, seed=3)
    assert w.shape == (50, 7) and np.all(w.sum(1) == 7) and w.min() >= 0
    np.testing.assert_array_equal(w, resample_weights(7, 50, seed=3))


def test_constant_shift_gives_a_degenerate_interval():
    rng = np.random.default_rng(0)
    weight = rng.integers(1, 100, (3, 40)).astype(float)
    b = {"v": np.stack([rng.random((3, 40)) * weight, weight], -1)}
    a = {"v": np.stack([b["v"][..., 0] + 0.25 * weight, weight], -1)}  # every resample: +0.25 exactly
    out = paired_bootstrap(ratio, a, b, num_samples=300)
    for k in ("diff", "low", "high"):
        assert out[k] == pytest.approx(0.25, abs=1e-12)


def test_mean_difference_matches_the_normal_interval():
    rng = np.random.default_rng(1)
    n = 400
    x = rng.normal(0.3, 2.0, n)
    a = {"v": np.stack([x, np.ones(n)], -1)[None]}
    b = {"v": np.stack([np.zeros(n), np.ones(n)], -1)[None]}
    out = paired_bootstrap(ratio, a, b, num_samples=4000, seed=2)
    half = 1.959964 * x.std() / np.sqrt(n)
    assert out["diff"] == pytest.approx(x.mean(), abs=1e-12)
    assert out["low"] == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert out["high"] == pytest.approx(x.mean() + half, abs=0.1 * half)


def test_seeds_are_paired_and_averaged():
    rng = np.random.default_rng(2)
    w = np.ones((2, 30))
    b = {"v": np.stack([rng.random((2, 30)), w], -1)}
    shift = np.array([0.1, 0.3])[:, None]  # seed 0: +0.1, seed 1: +0.3 on every image
    a = {"v": np.stack([b["v"][..., 0] + shift, w], -1)}
    out = paired_bootstrap(ratio, a, b, num_samples=100)
    assert out["low"] == pytest.approx(0.2) and out["high"] == pytest.approx(0.2)


def test_bad_inputs():
    v = {"v": np.ones((1, 5, 2))}
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(ratio, v, v, confidence=1.5)
    with pytest.raises(ValueError, match="seeds, images"):
        paired_bootstrap(ratio, v, {"v": np.ones((1, 4, 2))})
