"""The colour kernel that layers can start from (issue 26, "start from the classic").

DenseCRF's bilateral kernel couples two pixels by ``exp(-|I_i - I_j|^2 / (2 sigma^2))`` of their
colours (Krähenbühl & Koltun 2011, eq. 3). A layer built with ``colour_sigma_init = sigma > 0``
keeps a learned per-channel scale ``s`` (:func:`colour_scale`, ``1 / (sqrt(2) sigma)`` at the
start) and reads, for each stencil neighbour, the scaled squared colour distance
``sum_c s_c^2 (I_i - I_k)_c^2`` (:func:`scaled_colour_distances`): SPN adds its exponential to
its gates, the dilated-affinity head adds its negative to its affinity logits. (GCRF's
similarity starts at the same kernel through its own pairwise network and shares only the width
check.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rwseg.rwn import feature_distances

__all__ = ["COLOUR_CHANNELS", "check_colour_sigma", "colour_scale", "scaled_colour_distances"]

COLOUR_CHANNELS = 3


def check_colour_sigma(sigma) -> bool:
    """Whether a layer gets the colour term: ``False`` for 0, ``True`` for a positive width.

    Args:
      sigma: ``colour_sigma_init``, a width in the colour's units.

    Returns:
      ``sigma > 0``.

    Raises:
      ValueError: naming ``colour_sigma_init`` for a negative or NaN width.
    """
    if not (sigma == 0 or sigma > 0):  # NaN too
        raise ValueError(f"colour_sigma_init: expected 0 (no colour term) or a positive width, got {sigma}")
    return bool(sigma)


def colour_scale(sigma: float) -> nnx.Param:
    """The learned per-channel scale ``s``, ``1 / (sqrt(2) sigma)`` in every colour channel.

    Args:
      sigma: ``colour_sigma_init`` (> 0).

    Returns:
      a (3,) float32 parameter.
    """
    return nnx.Param(jnp.full((COLOUR_CHANNELS,), 1.0 / (math.sqrt(2.0) * sigma), jnp.float32))


def scaled_colour_distances(colour, scale, offsets):
    """``sum_c s_c^2 (I_i - I_k)_c^2`` to every stencil neighbour, per pixel.

    Args:
      colour: (B, H, W, 3) float colour (e.g. the ImageNet-normalised image).
      scale: (3,) float, the per-channel ``s``.
      offsets: K stencil offsets ``(dy, dx)``.

    Returns:
      (B, H, W, K) float; 0 where the neighbour ``i + o_k`` is outside the image.
    """
    dist = jax.vmap(lambda c: feature_distances(c * scale, offsets))(colour)  # (B, H, W, K, 3)
    return jnp.sum(dist * dist, axis=-1)
