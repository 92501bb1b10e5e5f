"""RWN model (seed 000): backbone logits diffused by a random walk on learned affinities.

Affinity branch: features = the normalised image and the backbone's full-resolution
stem features (the paper's RGB + two low-level maps), average-pooled to the walk
resolution ``H / walk_downsample``; per-channel L1 distances to a disk of neighbours
(:func:`rwseg.rwn.feature_distances`), a 1x1 conv (``theta``, one weight per channel)
and ``exp`` (:func:`rwseg.rwn.affinity`).

Training: one walk step ``y = A f`` on a disk of radius ``train_radius`` (eq. 2), softmax
loss on ``y`` upsampled, plus ``affinity_weight`` x the squared-error affinity loss
(§3.3). Evaluation: the converged walk ``(1 - alpha)(I - alpha A)^-1 f`` on a disk of
radius ``eval_radius`` (eq. 3; symmetric affinities, so CG), solved matrix-free.

Config ``config.rwn``: ``walk_downsample``, ``train_radius``, ``eval_radius``, ``alpha``,
``affinity_weight``, ``theta_init``, ``tol``, ``max_iters``. Radii are in walk pixels
(the paper's R = 40 / 5 at full 321x321 resolution are too large for 64x64 crops).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rwseg import rwn as ops
from rwseg import stencil
from rwseg.models.backbone import pooled_grid, upsample
from rwseg.models.base import Segmenter, solver_stats
from rwseg.models.device_local import map_examples
from rwseg.models.common import avg_pool, cross_entropy, subsample_labels

__all__ = ["RWNModel"]


class RWNModel(Segmenter):
    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
        super().__init__(config, num_classes, rngs=rngs)
        c = config.rwn
        self.downsample = int(c.walk_downsample)
        self.train_offsets = stencil.disk_offsets(int(c.train_radius))
        self.eval_offsets = stencil.disk_offsets(int(c.eval_radius))
        self.alpha, self.affinity_weight = float(c.alpha), float(c.affinity_weight)
        self.tol, self.max_iters = float(c.tol), int(c.max_iters)
        channels = 3 + config.model.width
        self.theta = nnx.Param(jnp.full((channels,), float(c.theta_init), jnp.float32))

    def _inputs(self, images):
        """(f, features) at the walk resolution: (B, h, w, K), (B, h, w, 3 + width)."""
        out = self.backbone(images)
        feats = jnp.concatenate([images, out["stem"]], axis=-1)
        feats = avg_pool(feats, self.downsample)
        src = self.backbone.grid(images.shape[1:3])
        return upsample(out["logits"], feats.shape[1:3], src, pooled_grid(self.downsample)), feats

    def _weights(self, feats, offsets):
        theta = self.theta[...]
        return jax.vmap(lambda x: ops.affinity(ops.feature_distances(x, offsets), theta, offsets))(feats)

    def loss(self, batch, step):
        images, labels = batch["image"], batch["label"]
        f, feats = self._inputs(images)
        offsets = self.train_offsets
        weights = self._weights(feats, offsets)
        y = jax.vmap(lambda w, x: ops.random_walk(w, x, offsets, alpha=1.0, steps=1))(weights, f)
        ce = cross_entropy(upsample(y, images.shape[1:3], pooled_grid(self.downsample)), labels)
        small = subsample_labels(labels, self.downsample, self.num_classes)
        aff = jnp.mean(jax.vmap(lambda w, l: ops.affinity_loss(w, l, offsets))(weights, small))
        return ce + self.affinity_weight * aff, {"ce": ce, "affinity": aff}

    def infer(self, images):
        """Converged walk (one CG solve per image, device-local under a mesh) and its diagnostics."""
        f, feats = self._inputs(images)
        offsets = self.eval_offsets
        weights = self._weights(feats, offsets)

        def walk(w, x):
            y, info = ops.random_walk(w, x, offsets, alpha=self.alpha, steps=None, symmetric=True,
                                      tol=self.tol, max_iters=self.max_iters, return_info=True)
            return y, info.converged

        y, converged = map_examples(walk, weights, f)
        return upsample(y, images.shape[1:3], pooled_grid(self.downsample)), solver_stats(converged, y)
