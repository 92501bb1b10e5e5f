"""SPN refinement layer: learned three-way spatial propagation of any network's logits.

Liu, De Mello, Gu, Zhong, Yang, Kautz, "Learning Affinity via Spatial Propagation
Networks" (NeurIPS 2017): a guidance network on the image predicts, for each of the 4
directions, 3 gates per channel (eq. 5, stabilised by Theorem 3); the four linear
propagations (:func:`rwseg.spn.spn`) run over the logits and merge node-wise (§3.3).
Optionally (``colour_sigma_init > 0``, issue 26's "start from the classic") each gate also gets
a learned colour-kernel term, so that the layer starts as a colour-guided propagation.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from rwseg import spn as ops
from rwseg import stencil
from rwseg.layers import _inputs as I
from rwseg.layers.colour import COLOUR_CHANNELS, check_colour_sigma, colour_scale, scaled_colour_distances
from rwseg.layers.convs import apply_stack, conv_stack
from rwseg.layers.info import exact_steps
from rwseg.layers.device_local import map_examples
from rwseg.layers.grid import avg_pool, to_image, to_working_grid

__all__ = ["SpatialPropagation"]

NUM_DIRECTIONS, NUM_GATES = 4, 3


class SpatialPropagation(nnx.Module):
    """Four-direction three-way spatial propagation of logits (Liu et al. 2017, eq. 5, §3.3).

    Args:
      num_classes: K, channels of the logits to refine.
      guidance_channels: channels of the guidance network's 3x3 convs.
      guidance_depth: number of 3x3 conv blocks of the guidance network (0: the gates
        are one 3x3 conv on the image).
      downsample: the propagation runs at ``H / downsample x W / downsample``.
      merge: ``"max"`` (the paper's node-wise max) or ``"mean"`` over the directions.
      implementation: propagation kernel, as :func:`rwseg.spn.spn` (``"auto"``, ``"scan"``,
        ``"pallas"``).
      norm: ``"group"`` or ``"none"`` normalisation of the guidance blocks.
      colour_sigma_init: ``0``: the gates are the guidance network's alone (the paper).
        ``sigma > 0``: gate k of direction d also gets the colour-kernel term
        ``w_d exp(-sum_c s_c^2 (I_i - I_k)_c^2)`` of the pixel's colour and its neighbour's on
        the propagation grid (the ``colour`` argument, average-pooled), with learned
        ``s = 1 / (sqrt(2) sigma)`` per colour channel at the start (sigma in the colour's
        units) and learned ``w_d = colour_gate_init / 3``, so that the layer starts as a
        propagation along colour-homogeneous paths (issue 26: the classic's colour kernel).
      colour_gate_init: with ``colour_sigma_init > 0``, the gates' total
        ``sum_k p_k`` at zero colour difference at the start, in (0, 1] (Theorem 3's bound):
        how far a value travels through a homogeneous region (about ``1 / (1 - colour_gate_init)``
        cells).
      image_channels: channels of the image.
      rngs: parameter initialisation.

    Parameters: ``guidance`` (conv blocks) and ``gates`` (3x3 conv to 4·3·K gates,
    initialised near zero, so the layer starts close to the identity, or close to the
    colour-guided propagation); with ``colour_sigma_init > 0`` also ``colour_scale`` (C,)
    and ``colour_weight`` (4,).
    """

    def __init__(self, num_classes: int, *, guidance_channels: int = 16, guidance_depth: int = 2,
                 downsample: int = 1, merge: str = "max", implementation: str = "auto", norm: str = "group",
                 colour_sigma_init: float = 0.0, colour_gate_init: float = 0.99, image_channels: int = 3,
                 rngs: nnx.Rngs):
        if merge not in ("max", "mean"):
            raise ValueError(f"merge: expected 'max' or 'mean', got {merge!r}")
        if not 0 < colour_gate_init <= 1:
            raise ValueError(f"colour_gate_init: expected a value in (0, 1] (Theorem 3), got {colour_gate_init}")
        self.num_classes, self.downsample = int(num_classes), int(downsample)
        self.merge, self.implementation, self.image_channels = merge, implementation, int(image_channels)
        self.guidance, cin = conv_stack(self.image_channels, int(guidance_channels), int(guidance_depth),
                                        norm=norm, rngs=rngs)
        self.gates = nnx.Conv(cin, NUM_DIRECTIONS * NUM_GATES * self.num_classes, (3, 3),
                              kernel_init=nnx.initializers.normal(1e-3), rngs=rngs)
        self.colour_term = check_colour_sigma(colour_sigma_init)
        if self.colour_term:
            self.colour_scale = colour_scale(colour_sigma_init)
            self.colour_weight = nnx.Param(jnp.full((NUM_DIRECTIONS,), colour_gate_init / NUM_GATES, jnp.float32))

    def colour_kernel(self, colour):
        """The colour-kernel term of the gates (``colour_sigma_init``), before stabilisation.

        Args:
          colour: (B, H, W, 3) float, H and W divisible by ``downsample``.

        Returns:
          (B, 4, H/f, W/f, 1, 3): ``w_d exp(-sum_c s_c^2 (I_i - I_k)_c^2)`` for gate k of direction d
          (neighbours :func:`rwseg.spn.direction_offsets`; 0 where the neighbour is outside).
        """
        I.check_image(colour, channels=COLOUR_CHANNELS, downsample=self.downsample, name="colour")
        pooled = avg_pool(colour, self.downsample)
        h, w = pooled.shape[1:3]
        terms = []
        for d, direction in enumerate(ops.DIRECTIONS):
            offsets = ops.direction_offsets(direction, NUM_GATES)
            dist2 = scaled_colour_distances(pooled, self.colour_scale[...], offsets)  # (B, h, w, 3)
            inside = jnp.asarray(stencil.valid_mask(h, w, offsets), pooled.dtype)  # (h, w, 3)
            terms.append(self.colour_weight[d] * inside * jnp.exp(-dist2))
        return jnp.stack(terms, axis=1)[:, :, :, :, None, :]

    def guidance_gates(self, image, colour=None):
        """The guidance network's gates (plus the colour-kernel term), stabilised (eq. 5, Theorem 3).

        Args:
          image: (B, H, W, C) float.
          colour: (B, H, W, 3) float, the colour the kernel term compares (needed with
            ``colour_sigma_init > 0``, ignored otherwise).

        Returns:
          (B, 4, H/f, W/f, K, 3) gates with ``sum_k |p_k| <= 1``, directions in the order of
          :data:`rwseg.spn.DIRECTIONS`.
        """
        I.check_image(image, channels=self.image_channels, downsample=self.downsample)
        g = self.gates(apply_stack(self.guidance, avg_pool(image, self.downsample)))
        b, h, w, _ = g.shape
        g = jnp.moveaxis(g.reshape(b, h, w, NUM_DIRECTIONS, self.num_classes, NUM_GATES), 3, 1)
        if self.colour_term:
            if colour is None:
                raise ValueError("colour: expected the (B, H, W, 3) colour of the colour-kernel term (the layer was "
                                 "built with colour_sigma_init > 0), got None")
            size = (b, h * self.downsample, w * self.downsample)
            if I.check_image(colour, channels=COLOUR_CHANNELS, downsample=self.downsample, name="colour") != size:
                raise ValueError(f"colour: expected shape {size + (COLOUR_CHANNELS,)} (the image's B, H, W), "
                                 f"got {tuple(colour.shape)}")
            g = g + self.colour_kernel(colour)
        return ops.stabilize(g)

    def __call__(self, logits, image, *, colour=None, logits_grid=None, return_info: bool = False):
        """Refined logits.

        Args:
          logits: (B, h, w, K) float, any resolution, cells on ``logits_grid``.
          image: (B, H, W, C) float, H and W divisible by ``downsample``.
          colour: (B, H, W, 3) float colour for the colour-kernel term (``colour_sigma_init > 0``;
            e.g. the RGB image when ``image`` is a stack of guidance maps), ignored otherwise.
          logits_grid: where the logits' cells lie in image pixels (a
            :class:`rwseg.layers.grid.Grid` or a (rows, cols) pair); default: evenly
            tiling the image (:func:`rwseg.layers.grid.aligned_grid`).
          return_info: also return a :class:`rwseg.layers.RefinementInfo` (exact
            propagation: no solve, ``iterations`` = 1).

        Returns:
          (B, H, W, K) refined logits in the logits' dtype (``(refined, info)`` with
          ``return_info``).
        """
        b, h, w = I.check_image(image, channels=self.image_channels, downsample=self.downsample)
        I.check_map("logits", logits, b, self.num_classes, "num_classes")
        x = to_working_grid(logits, (h, w), self.downsample, logits_grid)
        gates = self.guidance_gates(image, colour)
        # device-local under a mesh: XLA cannot partition the Mosaic kernel ("auto" on TPU) over a sharded
        # batch, so each device propagates its own examples (jax.shard_map; plain vmap without a mesh)
        refined = map_examples(lambda xx, gg: ops.spn(xx, gg, merge=self.merge, implementation=self.implementation),
                               x, gates)
        if self.downsample > 1:
            refined = to_image(refined, (h, w), self.downsample)
        return (refined, exact_steps(b, 1)) if return_info else refined
