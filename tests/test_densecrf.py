"""experiments/densecrf.py: DenseCRF post-processing and scribble propagation (pydensecrf2).

Oracles: with no pairwise term the marginals are the unary's softmax (exact); on a two-colour
image the bilateral kernel snaps noisy probabilities to the colour regions, as an exact dense
mean field (numpy, every pair, no lattice) does on the same problem.
"""

import numpy as np
import pytest

pytest.importorskip("pydensecrf.densecrf")
from experiments import densecrf as D  # noqa: E402  (the repository root is on sys.path: conftest.py)


def _two_regions(h=12, w=16, num_labels=3, seed=0):
    """Left half red (label 0), right half blue (label 2); probabilities favour the right
    label on about 70 % of the pixels and a random wrong one elsewhere."""
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = (200, 30, 30)
    image[:, w // 2:] = (30, 30, 200)
    truth = np.where(np.arange(w)[None, :] < w // 2, 0, 2).repeat(h, 0)
    noisy = np.where(rng.random((h, w)) < 0.7, truth, rng.integers(0, num_labels, (h, w)))
    probs = np.full((h, w, num_labels), 0.2, np.float32)
    np.put_along_axis(probs, noisy[..., None], 0.6, axis=-1)
    return image, probs / probs.sum(-1, keepdims=True), truth


def _dense_mean_field(image, probs, p: D.DenseCRFParams):
    """Exact fully connected mean field (Krähenbühl & Koltun, Algorithm 1) with Potts
    compatibility, every pair summed explicitly."""
    h, w, num_labels = probs.shape
    yy, xx = np.mgrid[:h, :w]
    pos = np.stack([yy, xx], -1).reshape(-1, 2).astype(np.float64)
    rgb = image.reshape(-1, 3).astype(np.float64)
    d2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    c2 = ((rgb[:, None] - rgb[None]) ** 2).sum(-1)
    k = (p.bilateral_compat * np.exp(-d2 / (2 * p.bilateral_sxy ** 2) - c2 / (2 * p.bilateral_srgb ** 2))
         + p.gaussian_compat * np.exp(-d2 / (2 * p.gaussian_sxy ** 2)))
    np.fill_diagonal(k, 0.0)
    unary = -np.log(probs.reshape(-1, num_labels))
    q = probs.reshape(-1, num_labels)
    for _ in range(p.iterations):
        msg = k @ q
        energy = unary + (msg.sum(-1, keepdims=True) - msg)  # Potts: penalty from every other label
        q = np.exp(-(energy - energy.min(-1, keepdims=True)))
        q /= q.sum(-1, keepdims=True)
    return q.reshape(h, w, num_labels)


def test_no_pairwise_term_returns_the_unary_softmax():
    image, probs, _ = _two_regions()
    p = D.DenseCRFParams(gaussian_compat=0.0, bilateral_compat=0.0, iterations=5)
    np.testing.assert_allclose(D.densecrf(image, probs, p), probs, atol=1e-5)


def test_bilateral_kernel_snaps_to_colour_regions_like_exact_mean_field():
    image, probs, truth = _two_regions()
    image.flags.writeable = False  # as a data source's arrays are
    p = D.DenseCRFParams(gaussian_sxy=3, gaussian_compat=1, bilateral_sxy=20, bilateral_srgb=10, bilateral_compat=5,
                         iterations=5)
    q = D.densecrf(image, probs, p)
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-4)
    assert (probs.argmax(-1) == truth).mean() < 0.85  # the input is noisy
    np.testing.assert_array_equal(q.argmax(-1), truth)
    np.testing.assert_array_equal(_dense_mean_field(image, probs, p).argmax(-1), truth)


def test_scribble_propagation_fills_each_colour_region():
    image, _, truth = _two_regions()
    scribbles = np.full(truth.shape, -1)
    scribbles[5, 2], scribbles[6, 13] = 0, 2
    p = D.DenseCRFParams(bilateral_sxy=30, bilateral_srgb=10, bilateral_compat=10, iterations=10)
    q = D.propagate_scribbles(image, scribbles, 3, p)
    np.testing.assert_array_equal(q.argmax(-1), truth)


@pytest.mark.parametrize("call, match", [
    (lambda im, pr: D.densecrf(im.astype(np.float32), pr), "image: expected uint8"),
    (lambda im, pr: D.densecrf(im, pr[:-1]), "probs: expected"),
    (lambda im, pr: D.densecrf(im, np.full_like(pr, np.nan)), "probs: expected finite"),
    (lambda im, pr: D.propagate_scribbles(im, np.full(im.shape[:2], 3), 3), "scribbles: expected labels"),
    (lambda im, pr: D.DenseCRFParams(bilateral_srgb=0.0), "bilateral_srgb"),
])
def test_bad_input_names_the_argument(call, match):
    image, probs, _ = _two_regions()
    with pytest.raises(ValueError, match=match):
        call(image, probs)
