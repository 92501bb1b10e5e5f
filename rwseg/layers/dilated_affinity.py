"""Dilated affinity layer: an affinity head next to any network's logits, its focal loss and
the affinity propagation refinement.

Wu et al., dilated affinity for semantic segmentation (docs/methods.md §5): a 1x1 conv
on features predicts, for each rate r of ``rates``, the affinity logits of the 8 neighbours at distance r (8·|R| channels, in
the order of :func:`rwseg.stencil.dilated_offsets`); training adds the reweighted focal
loss (eq. 4-5, :func:`rwseg.dilated.affinity_loss`), testing refines the class
probabilities by affinity propagation (eq. 6-7, :func:`rwseg.dilated.propagate`). The
head's bias starts at the dataset prior (§4.1, :func:`rwseg.dilated.prior_bias`), read
from a table of neighbour-category frequencies of training labels
(:meth:`DilatedAffinity.frequencies_from_labels`). Optionally (``colour_sigma_init > 0``, issue
26's "start from the classic") the affinity logits also get a learned colour term, the log of
DenseCRF's colour kernel (:mod:`rwseg.layers.colour`), so that the propagation starts closed
across colour edges.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwseg import dilated as ops
from rwseg import stencil
from rwseg.layers import _inputs as I
from rwseg.layers.colour import COLOUR_CHANNELS, check_colour_sigma, colour_scale, scaled_colour_distances
from rwseg.layers.convs import apply_stack, conv_stack
from rwseg.layers.info import exact_steps
from rwseg.layers.grid import aligned_grid, upsample
from rwseg.layers.statistic import Statistic

__all__ = ["DilatedAffinity"]


def _as_rates(rates):
    return tuple(tuple(int(v) for v in r) if isinstance(r, (tuple, list)) else int(r) for r in rates)


class DilatedAffinity(nnx.Module):
    """Affinity head + focal affinity loss + affinity propagation (eq. 4-7).

    Args:
      num_classes: K, channels of the logits.
      feature_channels: channels of the features the head sees (e.g. decoder features,
        any resolution).
      rates: dilation rates in image pixels (ints or (r1, r2) pairs).
      frequencies: (|R|, 9) neighbour-category table of the training labels
        (:meth:`frequencies_from_labels`); stored with the layer (a
        :class:`rwseg.layers.statistic.Statistic`, checkpointed, not trained).
      low_level_channels: channels of optional image-resolution features concatenated
        to the upsampled features before the head (a DeepLabv3+-style decoder; 0: the
        head runs on the features at their resolution and its output is upsampled).
      decoder_width: channels of the affinity decoder's 3x3 conv blocks.
      decoder_depth: number of those blocks between the (concatenated) features and the
        1x1 head (0: the head is a 1x1 conv on the features themselves). The paper's head
        is a 1x1 conv on a DeepLabv3+ decoder (§4.1): a decoder lets the head see where a
        boundary lies relative to the pixel, which a 1x1 conv on upsampled coarse
        features cannot.
      norm: ``"group"`` or ``"none"`` normalisation of the decoder blocks.
      gamma: focal-loss exponent (eq. 4).
      lam: propagation weight of the pixel's own prediction (eq. 6; the paper: 6).
      mu: steepness of the affinity gate (eq. 7; the paper: 7).
      colour_sigma_init: ``0``: the affinity logits are the head's alone (the paper).
        ``sigma > 0``: the logit of pixel i's neighbour k also gets the colour term
        ``-sum_c s_c^2 (I_i - I_k)_c^2`` of the image's colours (the log of DenseCRF's colour
        kernel), with learned ``s = 1 / (sqrt(2) sigma)`` per colour channel at the start
        (sigma in the image's units), and the head's kernel starts at 0: the gate
        ``sigmoid(mu (b_r - sum_c s_c^2 (I_i - I_k)_c^2))`` at the start is the prior bias
        ``b_r`` closed by colour differences (issue 26: start from the classic).
      num_steps: propagation iterations.
      rngs: parameter initialisation.

    Parameters: ``decoder`` (``decoder_depth`` 3x3 conv blocks, none by default),
    ``affinity_head`` (1x1 conv, bias initialised at the prior; its kernel at 0 with
    ``colour_sigma_init > 0``), ``colour_scale`` (3,) with ``colour_sigma_init > 0``; statistic
    ``frequencies``.
    """

    def __init__(self, num_classes: int, feature_channels: int, *, rates, frequencies,
                 low_level_channels: int = 0, decoder_width: int = 0, decoder_depth: int = 0,
                 norm: str = "group", gamma: float = 2.0, lam: float = 6.0, mu: float = 7.0,
                 num_steps: int = 10, colour_sigma_init: float = 0.0, rngs: nnx.Rngs):
        self.num_classes, self.rates = int(num_classes), _as_rates(rates)
        self.feature_channels, self.low_level_channels = int(feature_channels), int(low_level_channels)
        self.gamma, self.lam, self.mu, self.num_steps = float(gamma), float(lam), float(mu), int(num_steps)
        freq = np.asarray(frequencies, np.float32)
        if freq.shape != (len(self.rates), ops.NUM_CATEGORIES):
            raise ValueError(f"frequencies: expected shape ({len(self.rates)}, {ops.NUM_CATEGORIES}) for rates "
                             f"{self.rates}, got {freq.shape}")
        self.frequencies = Statistic(jnp.asarray(freq))
        bias = jnp.repeat(ops.prior_bias(jnp.asarray(freq)), 8).astype(jnp.float32)
        if int(decoder_depth) < 0 or (int(decoder_depth) > 0 and int(decoder_width) < 1):
            raise ValueError(f"decoder_depth, decoder_width: expected depth 0, or depth >= 1 with width >= 1, got "
                             f"depth {decoder_depth}, width {decoder_width}")
        self.decoder, head_channels = conv_stack(self.feature_channels + self.low_level_channels,
                                                 int(decoder_width), int(decoder_depth), norm=norm, rngs=rngs)
        self.affinity_head = nnx.Conv(head_channels, 8 * len(self.rates), (1, 1), bias_init=lambda *_: bias,
                                      rngs=rngs)
        self.colour_term = check_colour_sigma(colour_sigma_init)
        if self.colour_term:
            self.colour_scale = colour_scale(colour_sigma_init)
            self.affinity_head.kernel[...] = jnp.zeros_like(self.affinity_head.kernel[...])

    @staticmethod
    def frequencies_from_labels(label_maps, rates, *, ignore_index: int = 255) -> np.ndarray:
        """(|R|, 9) float32 table for ``frequencies`` from training label maps.

        label_maps: a (N, H, W) int array or an iterable of (H, W) int maps (streamed).
        """
        maps = list(np.asarray(label_maps)) if hasattr(label_maps, "shape") else label_maps
        return ops.category_frequencies(maps, _as_rates(rates), ignore_index=ignore_index).astype(np.float32)

    def affinity_logits(self, image, features, low_level=None, *, features_grid=None):
        """The affinity head's logits at image resolution.

        Args:
          image: (B, H, W, C) (its size only; with ``colour_sigma_init > 0`` the (B, H, W, 3)
            colour the colour term compares).
          features: (B, h, w, feature_channels) float on ``features_grid`` (default: evenly
            tiling the image).
          low_level: (B, H, W, low_level_channels) float, required when the layer was built
            with them.

        Returns:
          (B, H, W, 8·|R|), channel c = offset c of :func:`rwseg.stencil.dilated_offsets` (the
          head's, minus the scaled squared colour distance with ``colour_sigma_init > 0``).
        """
        b, h, w = I.check_image(image, channels=COLOUR_CHANNELS if self.colour_term else None)
        I.check_map("features", features, b, self.feature_channels, "feature_channels")
        grid = features_grid if features_grid is not None else aligned_grid(features.shape[1:3], (h, w))
        head = self._head_logits(features, low_level, grid, (h, w))
        if self.colour_term:
            return head - scaled_colour_distances(image, self.colour_scale[...], stencil.dilated_offsets(self.rates))
        return head

    def _affinities(self, image, features, low_level, features_grid, affinities):
        """``affinities`` when given (checked against the image), else :meth:`affinity_logits`."""
        if affinities is None:
            return self.affinity_logits(image, features, low_level, features_grid=features_grid)
        b, h, w = I.check_image(image, channels=None)
        I.check_map("affinities", affinities, b, 8 * len(self.rates), "8 x len(rates)")
        if tuple(affinities.shape[1:3]) != (h, w):
            raise ValueError(f"affinities: expected the image size {(h, w)} (affinity_logits' output), "
                             f"got {tuple(affinities.shape[1:3])}")
        return affinities

    def _head_logits(self, features, low_level, grid, size):
        """The head's (B, H, W, 8·|R|) logits at the image ``size`` (arguments: :meth:`affinity_logits`)."""
        b, (h, w) = features.shape[0], size
        if self.low_level_channels:
            if low_level is None:
                raise ValueError(f"low_level: expected (B, H, W, {self.low_level_channels}) features (the layer "
                                 "was built with low_level_channels > 0), got None")
            I.check_map("low_level", low_level, b, self.low_level_channels, "low_level_channels")
            if tuple(low_level.shape[1:3]) != (h, w):
                raise ValueError(f"low_level: expected the image size {(h, w)}, got {tuple(low_level.shape[1:3])}")
            x = jnp.concatenate([upsample(features, (h, w), grid), low_level], axis=-1)
            return self.affinity_head(apply_stack(self.decoder, x))
        if low_level is not None:
            raise ValueError("low_level: the layer was built with low_level_channels=0, got features")
        return upsample(self.affinity_head(apply_stack(self.decoder, features)), (h, w), grid)

    def __call__(self, logits, image, features, low_level=None, *, logits_grid=None, features_grid=None,
                 affinities=None, return_info: bool = False):
        """Affinity propagation of ``softmax(logits)`` (eq. 6-7), ``num_steps`` iterations.

        Args:
          logits: (B, h, w, K) float, any resolution, cells on ``logits_grid``.
          image: (B, H, W, C) float (its size sets the output's).
          features: the head's inputs, as :meth:`affinity_logits`.
          low_level: see ``features``.
          features_grid: see ``features``.
          logits_grid: cell placement of the logits (default: evenly tiling the image).
          affinities: optional, :meth:`affinity_logits` of the same inputs, computed once for
            this call and :meth:`affinity_loss` in a training step.
          return_info: also return a :class:`rwseg.layers.RefinementInfo` (exact steps).

        Returns:
          (B, H, W, K) refined class probabilities (each pixel sums to 1 after one step;
          ``(probs, info)`` with ``return_info``).
        """
        b, h, w = I.check_image(image, channels=None)
        I.check_map("logits", logits, b, self.num_classes, "num_classes")
        aff = self._affinities(image, features, low_level, features_grid, affinities)
        grid = logits_grid if logits_grid is not None else aligned_grid(logits.shape[1:3], (h, w))
        probs = jax.nn.softmax(upsample(logits, (h, w), grid), axis=-1)
        refine = lambda p, a: ops.propagate(p, a, self.rates, lam=self.lam, mu=self.mu, num_steps=self.num_steps)
        out = jax.vmap(refine)(probs, aff)
        return (out, exact_steps(b, self.num_steps)) if return_info else out

    def affinity_loss(self, image, labels, features, low_level=None, *, features_grid=None, affinities=None):
        """The reweighted focal affinity loss of eq. 4-5 (without the weight beta).

        Args:
          image: as for :meth:`affinity_logits`.
          features: as for :meth:`affinity_logits`.
          low_level: as for :meth:`affinity_logits`.
          features_grid: as for :meth:`affinity_logits`.
          labels: (B, H, W) int, 255 / negative ignored.
          affinities: optional, as for ``__call__``.

        Returns:
          Scalar, the batch mean of :func:`rwseg.dilated.affinity_loss`.
        """
        aff = self._affinities(image, features, low_level, features_grid, affinities)
        I.check_labels("labels", labels, aff.shape[:3])
        freq = self.frequencies[...]
        return jnp.mean(jax.vmap(
            lambda a, l: ops.affinity_loss(a, l, self.rates, freq, gamma=self.gamma))(aff, labels))
