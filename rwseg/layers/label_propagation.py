"""RAWKS layer: a boundary network whose random-walk label propagation from scribbles
supervises any segmentation network (the eq. 11 loss).

Vernaza and Chandraker, "Learning Random-Walk Label Propagation for Weakly-Supervised
Semantic Segmentation" (CVPR 2017): a boundary network gives ``B >= 0``; the scribbles
seed a random walk whose hitting probabilities P (eq. 5-8,
:func:`rwseg.rawks.hitting_probabilities`, one sparse solve per image with an implicit
gradient into B, eq. 9-10) supervise the network's ``Q = softmax(logits)`` through the
uncertainty-weighted loss (eq. 11, :func:`rwseg.rawks.rawks_loss`). At test time the
network's own logits are the prediction: this layer is a training-time module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rwseg import rawks as ops
from rwseg.layers import _inputs as I
from rwseg.layers.convs import apply_stack, conv_stack
from rwseg.layers.info import solved
from rwseg.layers.grid import avg_pool, subsample_scribbles, to_working_grid
from rwseg.layers.device_local import map_examples

__all__ = ["RandomWalkLabelPropagation"]


class RandomWalkLabelPropagation(nnx.Module):
    """Boundary network + random-walk label propagation + eq. 11 loss (Vernaza & Chandraker 2017).

    Args:
      num_classes: K, labels of the scribbles and channels of the logits.
      boundary_channels: channels of the boundary network's 3x3 convs.
      boundary_depth: number of 3x3 conv blocks before the boundary output conv.
      downsample: the propagation runs at ``H / downsample x W / downsample``.
      temperature: entropy temperature of the uncertainty weights ``w = exp(-temperature H(P))``
        of eq. 11.
      max_boundary: clamp of B.
      tol: tolerance of the hitting-probability solve.
      max_iters: CG iteration cap of the hitting-probability solve.
      norm: ``"group"`` or ``"none"`` normalisation of the boundary blocks.
      image_channels: channels of the image.
      rngs: parameter initialisation.

    Parameters: ``boundary_net`` (conv blocks) and ``boundary_out`` (3x3 conv to 1 channel).
    """

    def __init__(self, num_classes: int, *, boundary_channels: int = 16, boundary_depth: int = 2,
                 downsample: int = 2, temperature: float = 1.0, max_boundary: float = 10.0, tol: float = 1e-4,
                 max_iters: int = 300, norm: str = "group", image_channels: int = 3, rngs: nnx.Rngs):
        self.num_classes, self.downsample, self.image_channels = int(num_classes), int(downsample), int(image_channels)
        self.temperature, self.max_boundary = float(temperature), float(max_boundary)
        self.tol, self.max_iters = float(tol), int(max_iters)
        self.boundary_net, cin = conv_stack(self.image_channels, int(boundary_channels), int(boundary_depth),
                                            norm=norm, rngs=rngs)
        self.boundary_out = nnx.Conv(cin, 1, (3, 3), rngs=rngs)

    def boundary(self, image):
        """The boundary network's scores (softplus, clamped).

        Args:
          image: (B, H, W, C) float.

        Returns:
          B: (B, H/f, W/f) in [0, max_boundary].
        """
        I.check_image(image, channels=self.image_channels, downsample=self.downsample)
        b = jax.nn.softplus(self.boundary_out(apply_stack(self.boundary_net, avg_pool(image, self.downsample)))[..., 0])
        return jnp.minimum(b, self.max_boundary)

    def __call__(self, image, scribbles, *, return_info: bool = False):
        """Hitting probabilities P of the scribbles (eq. 5-8).

        Args:
          image: (B, H, W, C) float, H and W divisible by ``downsample``.
          scribbles: (B, H, W) int, -1 = unlabelled, 0..K-1 = labelled (thin strokes survive the
            subsampling to the propagation grid, :func:`rwseg.layers.grid.subsample_scribbles`).
          return_info: also return a :class:`rwseg.layers.RefinementInfo` (one refined CG solve
            per image, device-local under a mesh).

        Returns:
          P (B, H/f, W/f, K) (``(P, info)`` with ``return_info``).
        """
        shape = I.check_image(image, channels=self.image_channels, downsample=self.downsample)
        I.check_labels("scribbles", scribbles, shape)
        b = self.boundary(image)
        seeds = subsample_scribbles(scribbles, self.downsample)

        def hit(bb, s):
            p, info = ops.hitting_probabilities(bb, s, self.num_classes, tol=self.tol, max_iters=self.max_iters,
                                                return_info=True)
            return p, info.solve

        p, si = map_examples(hit, b, seeds)
        return (p, solved(si.converged, si.iterations, si.residual, p)) if return_info else p

    def loss(self, logits, image, scribbles, *, logits_grid=None, fixed_targets: bool = False,
             targets: str = "soft"):
        """The uncertainty-weighted loss of eq. 11 of the network's logits against P, a scalar.

        Args:
          logits: (B, h, w, K) float, any resolution, cells on ``logits_grid`` (default:
            evenly tiling the image); resampled to the propagation grid.
          image: as for ``__call__``.
          scribbles: as for ``__call__``.
          fixed_targets: treat P (and with it the weights w) as constants: no gradient
            reaches the boundary network and no adjoint solve is made (the paper's "train
            P, Q, then Q" stage, where Q is fine-tuned on the propagated labels).
          targets: ``"soft"`` (eq. 11) or ``"hard"`` (cross-entropy on argmax P where P does
            not abstain, a diagnostic; needs ``fixed_targets``), as in
            :func:`rwseg.rawks.rawks_loss`.

        Returns:
          The batch mean of :func:`rwseg.rawks.rawks_loss` (gradients reach both the
          network, through Q, and the boundary network, through P, unless ``fixed_targets``).
        """
        shape = I.check_image(image, channels=self.image_channels, downsample=self.downsample)
        I.check_map("logits", logits, shape[0], self.num_classes, "num_classes")
        if targets == "hard" and not fixed_targets:
            raise ValueError("targets='hard' needs fixed_targets=True: argmax P carries no gradient "
                             "to the boundary network (train the walk with targets='soft')")
        p = self(image, scribbles)
        if fixed_targets:
            p = jax.lax.stop_gradient(p)
        q = to_working_grid(logits, shape[1:], self.downsample, logits_grid)
        return jnp.mean(jax.vmap(lambda pp, qq: ops.rawks_loss(pp, qq, temperature=self.temperature, targets=targets))(p, q))
