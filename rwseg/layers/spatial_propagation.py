"""SPN refinement layer: learned three-way spatial propagation of any network's logits.

Liu, De Mello, Gu, Zhong, Yang, Kautz, "Learning Affinity via Spatial Propagation
Networks" (NeurIPS 2017): a guidance network on the image predicts, for each of the 4
directions, 3 gates per channel (eq. 5, stabilised by Theorem 3); the four linear
propagations (:func:`rwseg.spn.spn`) run over the logits and merge node-wise (§3.3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rwseg import spn as ops
from rwseg.layers import _inputs as I
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
      image_channels: channels of the image.
      rngs: parameter initialisation.

    Parameters: ``guidance`` (conv blocks) and ``gates`` (3x3 conv to 4·3·K gates,
    initialised near zero, so the layer starts close to the identity).
    """

    def __init__(self, num_classes: int, *, guidance_channels: int = 16, guidance_depth: int = 2,
                 downsample: int = 1, merge: str = "max", implementation: str = "auto", norm: str = "group",
                 image_channels: int = 3, rngs: nnx.Rngs):
        if merge not in ("max", "mean"):
            raise ValueError(f"merge: expected 'max' or 'mean', got {merge!r}")
        self.num_classes, self.downsample = int(num_classes), int(downsample)
        self.merge, self.implementation, self.image_channels = merge, implementation, int(image_channels)
        self.guidance, cin = conv_stack(self.image_channels, int(guidance_channels), int(guidance_depth),
                                        norm=norm, rngs=rngs)
        self.gates = nnx.Conv(cin, NUM_DIRECTIONS * NUM_GATES * self.num_classes, (3, 3),
                              kernel_init=nnx.initializers.normal(1e-3), rngs=rngs)

    def guidance_gates(self, image):
        """The guidance network's gates, stabilised (eq. 5, Theorem 3).

        Args:
          image: (B, H, W, C) float.

        Returns:
          (B, 4, H/f, W/f, K, 3) gates with ``sum_k |p_k| <= 1``, directions in the order of
          :data:`rwseg.spn.DIRECTIONS`.
        """
        I.check_image(image, channels=self.image_channels, downsample=self.downsample)
        g = self.gates(apply_stack(self.guidance, avg_pool(image, self.downsample)))
        b, h, w, _ = g.shape
        g = jnp.moveaxis(g.reshape(b, h, w, NUM_DIRECTIONS, self.num_classes, NUM_GATES), 3, 1)
        return ops.stabilize(g)

    def __call__(self, logits, image, *, logits_grid=None, return_info: bool = False):
        """Refined logits.

        Args:
          logits: (B, h, w, K) float, any resolution, cells on ``logits_grid``.
          image: (B, H, W, C) float, H and W divisible by ``downsample``.
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
        gates = self.guidance_gates(image)
        # device-local under a mesh: XLA cannot partition the Mosaic kernel ("auto" on TPU) over a sharded
        # batch, so each device propagates its own examples (jax.shard_map; plain vmap without a mesh)
        refined = map_examples(lambda xx, gg: ops.spn(xx, gg, merge=self.merge, implementation=self.implementation),
                               x, gates)
        if self.downsample > 1:
            refined = to_image(refined, (h, w), self.downsample)
        return (refined, exact_steps(b, 1)) if return_info else refined
