"""RWN refinement layer: a random walk on learned affinities diffusing any network's logits.

Bertasius, Torresani, Yu, Shi, "Convolutional Random Walk Networks for Semantic Image
Segmentation" (CVPR 2017): affinities from per-channel L1 distances of low-level
features (the image and, optionally, first-layer features), a 1x1 conv ``theta`` and
``exp`` (:func:`rwseg.rwn.affinity`); training runs the one-step walk layer ``y = A f``
(eq. 2) with the affinity loss (§3.3), testing the converged walk
``(1 - alpha)(I - alpha A)^-1 f`` (eq. 3), one matrix-free CG solve per image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rwseg import rwn as ops
from rwseg import stencil
from rwseg.layers import _inputs as I
from rwseg.layers.info import exact_steps, solved
from rwseg.layers.grid import avg_pool, subsample_labels, to_image, to_working_grid
from rwseg.layers.device_local import map_examples
from rwseg.layers.memory import remat_enabled

__all__ = ["RandomWalkRefinement"]

WALK_ON = ("logits", "probabilities")  # what the walk diffuses (RandomWalkRefinement's walk_on)


class RandomWalkRefinement(nnx.Module):
    """Random-walk refinement of logits on learned affinities (Bertasius et al. 2017, eq. 2-3).

    Args:
      num_classes: K, channels of the logits.
      feature_channels: channels of the optional low-level features given with the image
        (0: the affinities see the image only).
      downsample: the walk runs at ``H / downsample x W / downsample``.
      train_radius: disk radius (walk pixels) of the one-step training walk.
      eval_radius: disk radius of the converged test-time walk.
      eval_rates: dilation rates of sparse rings added to the test-time stencil: for each
        rate r the 8 neighbours at ``{-r, 0, r}^2`` (:func:`rwseg.stencil.dilated_offsets`),
        so the converged walk also links pixels ``r`` apart whose colours agree, whatever
        lies between (the reach of a dense CRF's bilateral kernel, Krähenbühl & Koltun
        2011, at a stencil's cost); ``()``: the disk alone (the paper's).
      alpha: restart probability of the converged walk, in [0, 1).
      walk_on: what the walk diffuses: ``"logits"`` (the paper's f, the network's scores) or
        ``"probabilities"`` (their softmax; the layer then returns the log of the walked
        probabilities). On probabilities each pixel's vote weighs at most 1, as in the messages
        of a dense CRF's mean field (Krähenbühl & Koltun 2011, eq. 4); on logits a confident
        pixel outvotes its neighbours by its logits' magnitude.
      theta_init: initial 1x1 conv weight over each image channel's distances (strongly
        negative, e.g. -3 on normalised colour, starts the walk at an edge-stopping colour
        kernel, the bilateral term of a dense CRF; near 0 starts it almost uniform).
      feature_theta_init: initial weight over each low-level feature channel's distances.
      tol: CG relative tolerance of the converged walk.
      max_iters: CG iteration cap of the converged walk.
      image_channels: channels of the image.
      rngs: accepted for a uniform signature (``theta`` is initialised to a constant).

    Parameters: ``theta`` (image_channels + feature_channels,): the image channels' weights, then
    the features'.
    """

    def __init__(self, num_classes: int, *, feature_channels: int = 0, downsample: int = 1,
                 train_radius: int = 4, eval_radius: int = 2, eval_rates: tuple = (), alpha: float = 0.9,
                 walk_on: str = "logits", theta_init: float = -0.2,
                 feature_theta_init: float = -0.2, tol: float = 1e-5, max_iters: int = 200, image_channels: int = 3,
                 rngs: nnx.Rngs | None = None):
        if not 0 <= float(alpha) < 1:
            raise ValueError(f"alpha: expected a restart probability in [0, 1), got {alpha!r}")
        if walk_on not in WALK_ON:
            raise ValueError(f"walk_on: expected one of {WALK_ON}, got {walk_on!r}")
        self.walk_on = walk_on
        self.num_classes, self.downsample = int(num_classes), int(downsample)
        self.feature_channels, self.image_channels = int(feature_channels), int(image_channels)
        self.train_offsets = stencil.disk_offsets(int(train_radius))
        disk = stencil.disk_offsets(int(eval_radius))
        rings = stencil.dilated_offsets(tuple(eval_rates)) if len(eval_rates) else ()
        self.eval_offsets = disk + tuple(o for o in dict.fromkeys(rings) if o not in disk)
        self.alpha, self.tol, self.max_iters = float(alpha), float(tol), int(max_iters)
        self.theta = nnx.Param(jnp.concatenate([jnp.full((self.image_channels,), float(theta_init), jnp.float32),
                                                jnp.full((self.feature_channels,), float(feature_theta_init),
                                                         jnp.float32)]))

    def _features(self, image, features, features_grid):
        """Affinity features (B, H/f, W/f, C + F) on the walk grid."""
        b, h, w = I.check_image(image, channels=self.image_channels, downsample=self.downsample)
        if features is None:
            if self.feature_channels:
                raise ValueError(f"features: expected (B, h, w, {self.feature_channels}) low-level features "
                                 "(the layer was built with feature_channels > 0), got None")
            return avg_pool(image, self.downsample)
        I.check_map("features", features, b, self.feature_channels, "feature_channels")
        if features_grid is None and tuple(features.shape[1:3]) == (h, w):  # pooled together, as one map
            return avg_pool(jnp.concatenate([image, features], axis=-1), self.downsample)
        return jnp.concatenate([avg_pool(image, self.downsample),
                                to_working_grid(features, (h, w), self.downsample, features_grid)], axis=-1)

    def affinities(self, image, features=None, *, train: bool = False, features_grid=None):
        """The learned affinities W of eq. 2 on the training (``train``) or the test disk.

        Args:
          image: as for ``__call__``.
          features: as for ``__call__``.
          features_grid: as for ``__call__``.
          train: the training disk (``train_radius``) or the test disk (``eval_radius``).

        Returns:
          (B, H/f, W/f, N) nonnegative, symmetric affinities, N = the disk's offsets.
        """
        offsets = self.train_offsets if train else self.eval_offsets
        theta = self.theta[...]
        feats = self._features(image, features, features_grid)
        return jax.vmap(lambda x: ops.affinity(ops.feature_distances(x, offsets), theta, offsets))(feats)

    def __call__(self, logits, image, features=None, *, train: bool = False, logits_grid=None,
                 features_grid=None, affinities=None, return_info: bool = False):
        """Refined scores.

        Args:
          logits: (B, h, w, K) float, any resolution, cells on ``logits_grid``.
          image: (B, H, W, C) float, H and W divisible by ``downsample``.
          features: optional (B, h', w', feature_channels) low-level features on
            ``features_grid`` (e.g. first-layer features at image resolution).
          train: ``True``: the one-step walk ``y = A f`` on the training disk (eq. 2),
            differentiated through; ``False``: the converged walk (eq. 3), one CG solve
            per image (device-local under a mesh, :func:`rwseg.layers.device_local.map_examples`),
            differentiated implicitly.
          logits_grid: cell placement of those maps (default: evenly tiling
            the image).
          features_grid: see ``logits_grid``.
          affinities: optional, :meth:`affinities` of the same inputs and ``train``, computed
            once for this call and :meth:`affinity_loss` in a training step.
          return_info: also return a :class:`rwseg.layers.RefinementInfo`.

        Returns:
          (B, H, W, K) refined scores (``(refined, info)`` with ``return_info``): walked logits, or
          with ``walk_on="probabilities"`` the log of the walked probabilities.
        """
        b, h, w = I.check_image(image, channels=self.image_channels, downsample=self.downsample)
        I.check_map("logits", logits, b, self.num_classes, "num_classes")
        f = to_working_grid(logits, (h, w), self.downsample, logits_grid)
        if self.walk_on == "probabilities":
            f = jax.nn.softmax(f, axis=-1)
        weights = affinities if affinities is not None else \
            self.affinities(image, features, train=train, features_grid=features_grid)
        if train:
            offsets = self.train_offsets
            remat = remat_enabled()  # config.remat: checkpoint the walk step
            y = jax.vmap(lambda ww, x: ops.random_walk(ww, x, offsets, alpha=1.0, num_steps=1, remat=remat))(weights, f)
            info = exact_steps(b, 1)
        else:
            offsets = self.eval_offsets

            def walk(ww, x):
                return ops.random_walk(ww, x, offsets, alpha=self.alpha, num_steps=None, symmetric=True,
                                       tol=self.tol, max_iters=self.max_iters, return_info=True)

            y, si = map_examples(walk, weights, f)
            info = solved(si.converged, si.iterations, si.residual, y)
        if self.walk_on == "probabilities":  # convex combinations of distributions: positive, up to rounding
            y = jnp.log(jnp.maximum(y, jnp.finfo(y.dtype).tiny))
        y = to_image(y, (h, w), self.downsample)
        return (y, info) if return_info else y

    def affinity_loss(self, image, labels, features=None, *, features_grid=None, affinities=None):
        """Squared error of the training-disk affinities against the labels' (§3.3), a scalar.

        Args:
          image: (B, H, W, C) float.
          labels: (B, H, W) int (``ignore_index`` 255 / negative: ignored), block-majority
            subsampled to the walk grid.
          features: as for ``__call__``.
          features_grid: as for ``__call__``.
          affinities: optional, :meth:`affinities` of the same inputs on the training disk
            (``train=True``), computed once for this call and the training walk.

        Returns:
          The mean over the batch of :func:`rwseg.rwn.affinity_loss`.
        """
        I.check_labels("labels", labels, I.check_image(image, channels=self.image_channels,
                                                        downsample=self.downsample))
        weights = affinities if affinities is not None else \
            self.affinities(image, features, train=True, features_grid=features_grid)
        small = subsample_labels(labels, self.downsample, self.num_classes)
        offsets = self.train_offsets
        return jnp.mean(jax.vmap(lambda ww, l: ops.affinity_loss(ww, l, offsets))(weights, small))
