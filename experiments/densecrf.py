"""DenseCRF (Krähenbühl & Koltun, NIPS 2011), the classic every seed paper compares with.

The fully connected CRF with Gaussian (position) and bilateral (position and colour) pairwise
kernels, solved by mean field with the permutohedral lattice (``pydensecrf2``, which imports
as ``pydensecrf``; ``pip install -e '.[densecrf]'``). DeepLab used it as post-processing of
the network's softmax; the refinement benchmark (``experiments/refine_benchmark.py
--densecrf``) does the same to the control and to every method, with the kernel parameters
chosen on the dev (validation) split by :data:`GRID`.

Energy (Krähenbühl & Koltun, eq. 1-3):

    E(x) = sum_i psi_u(x_i) + sum_{i<j} mu(x_i, x_j) k(f_i, f_j),
    k = w1 exp(-|p_i - p_j|^2 / 2 theta_a^2 - |I_i - I_j|^2 / 2 theta_b^2)   (bilateral, appearance)
      + w2 exp(-|p_i - p_j|^2 / 2 theta_g^2)                                 (Gaussian, smoothness)

with the Potts compatibility ``mu``; ``psi_u = -log p`` of the network's probabilities.
Parameter names follow pydensecrf: ``bilateral_sxy`` = theta_a (pixels), ``bilateral_srgb`` =
theta_b (0-255 colour units), ``bilateral_compat`` = w1, ``gaussian_sxy`` = theta_g,
``gaussian_compat`` = w2.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np


@dataclasses.dataclass(frozen=True)
class DenseCRFParams:
    """The kernel parameters of :func:`densecrf` (module docstring) and its mean-field steps.

    Attributes:
        gaussian_sxy: theta_g, the smoothness kernel's spatial bandwidth in pixels.
        gaussian_compat: w2, its weight.
        bilateral_sxy: theta_a, the appearance kernel's spatial bandwidth in pixels.
        bilateral_srgb: theta_b, its colour bandwidth (0-255 RGB units).
        bilateral_compat: w1, its weight.
        iterations: mean-field iterations.
    """

    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 121.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 4.0
    iterations: int = 10

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not np.isfinite(v) or v < 0 or (f.name != "gaussian_compat" and f.name != "bilateral_compat" and v == 0):
                raise ValueError(f"{f.name}: expected a finite value > 0 (>= 0 for a compat), got {v!r}")


# DeepLab-v2 (VGG-16) published parameters: bi_w 4, bi_xy_std 121, bi_rgb_std 5, pos_w 3, pos_xy_std 3.
DEEPLAB_V2 = DenseCRFParams()
# The pydensecrf README's example parameters.
PYDENSECRF_README = DenseCRFParams(gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80, bilateral_srgb=13,
                                   bilateral_compat=10, iterations=5)

# The dev-split grid (DeepLab chose its CRF parameters by a small grid on a held-out split;
# the Gaussian kernel stays at DeepLab's sxy 3 / compat 3, as there): 2 x 2 x 2 around the
# bandwidths that suit 320x240 photos, plus DeepLab-v2's own setting. Nine points, because one
# point costs about a minute on the 72 dev photos on 2 CPU cores.
GRID = tuple(DenseCRFParams(bilateral_sxy=sxy, bilateral_srgb=srgb, bilateral_compat=w)
             for sxy, srgb, w in itertools.product((30.0, 80.0), (3.0, 5.0), (3.0, 5.0))) + (DEEPLAB_V2,)


def _import():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("DenseCRF needs pydensecrf2: pip install -e '.[densecrf]' (or pydensecrf2==1.1)") from e
    return dcrf


def densecrf(image: np.ndarray, probs: np.ndarray, params: DenseCRFParams = DEEPLAB_V2) -> np.ndarray:
    """Mean-field marginals of the fully connected CRF over one image (module docstring).

    Args:
        image: uint8 ``(H, W, 3)`` RGB, the colours of the bilateral kernel.
        probs: float ``(H, W, L)`` class probabilities (each pixel sums to 1), the unary
            ``-log p`` (clipped at 1e-8).
        params: the kernel parameters.

    Returns:
        float32 ``(H, W, L)``: the marginals Q after ``params.iterations`` mean-field steps.

    Raises:
        ValueError: naming ``image`` or ``probs`` for a wrong shape, dtype or non-finite values.
    """
    dcrf = _import()
    image = np.asarray(image)
    probs = np.asarray(probs, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if probs.ndim != 3 or probs.shape[:2] != image.shape[:2]:
        raise ValueError(f"probs: expected (H, W, L) with (H, W) = {image.shape[:2]}, got {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs: expected finite probabilities, got NaN or inf")
    h, w, num_labels = probs.shape
    crf = dcrf.DenseCRF2D(w, h, num_labels)
    unary = -np.log(np.clip(probs, 1e-8, 1.0)).transpose(2, 0, 1).reshape(num_labels, -1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, np.float32))
    if params.gaussian_compat > 0:
        crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    if params.bilateral_compat > 0:
        crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                                 rgbim=np.require(image, np.uint8, ["C", "W"]),  # pydensecrf needs a writable buffer
                                 compat=params.bilateral_compat)
    q = np.asarray(crf.inference(int(params.iterations)), np.float32)
    return q.reshape(num_labels, h, w).transpose(1, 2, 0)


def propagate_scribbles(image: np.ndarray, scribbles: np.ndarray, num_labels: int,
                        params: DenseCRFParams = DEEPLAB_V2, *, confidence: float = 0.999) -> np.ndarray:
    """DenseCRF label propagation from scribbles, the classic RAWKS's P is compared with.

    Scribble pixels get a hard unary (probability ``confidence`` on their label), every other
    pixel a uniform one, so only the pairwise kernels carry the labels outwards.

    Args:
        image: uint8 ``(H, W, 3)``.
        scribbles: int ``(H, W)``, ``-1`` unlabelled, ``0..num_labels-1`` labelled.
        num_labels: ``L``.
        params: the kernel parameters.
        confidence: the probability of a scribble pixel's label, in ``(1/L, 1)``.

    Returns:
        float32 ``(H, W, L)`` marginals.

    Raises:
        ValueError: naming ``scribbles`` for labels outside ``[-1, L)`` or a shape unlike the
            image's, or ``confidence`` out of range.
    """
    scribbles = np.asarray(scribbles)
    if scribbles.shape != np.shape(image)[:2]:
        raise ValueError(f"scribbles: expected shape {np.shape(image)[:2]} (the image's), got {scribbles.shape}")
    if scribbles.size and (scribbles.min() < -1 or scribbles.max() >= num_labels):
        raise ValueError(f"scribbles: expected labels in [-1, {num_labels}), got [{scribbles.min()}, {scribbles.max()}]")
    if not 1.0 / num_labels < confidence < 1.0:
        raise ValueError(f"confidence: expected 1/num_labels < confidence < 1, got {confidence}")
    probs = np.full(scribbles.shape + (num_labels,), 1.0 / num_labels, np.float32)
    seeded = scribbles >= 0
    probs[seeded] = (1.0 - confidence) / (num_labels - 1)
    probs[seeded, scribbles[seeded]] = confidence
    return densecrf(image, probs, params)
