"""GCRF model (seed 003): unary network + pairwise network + Gaussian mean field.

Unary: softmax of the backbone logits (r). Pairwise: a 1x1 conv over the decoder
features and the image gives pixel features z; ``filters`` (D, M) and the compatibility
parameter ``r`` (K, K, ``C = R R^T``) are learned; ``s_ij`` on the bipartite stencil
(:func:`rwseg.gcrf.pairwise_similarity`). GMF (:func:`rwseg.gcrf.gmf`) runs at
``H / crf_downsample`` (the paper: 1/8) and its output is bilinearly upsampled.

Training: ``num_layers`` unrolled GMF layers (the paper's 5), the margin loss (eq. 6)
plus ``aux_weight`` x cross-entropy on the unary logits (the paper pretrains the unary
network instead); during the first ``pretrain_steps`` steps the pairwise pretraining
loss (eq. 7) is added with weight ``pretrain_weight``. Evaluation: GMF to the tolerance
``tol`` (``lax.while_loop``).

Config ``config.gcrf``: ``radius``, ``crf_downsample``, ``features`` (D), ``filters`` (M,
0 = number of classes), ``num_layers``, ``tol``, ``max_layers``, ``margin``,
``aux_weight``, ``pretrain_steps``, ``pretrain_weight``, ``compat_init``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rwseg import gcrf as ops
from rwseg.models.backbone import pooled_grid, upsample
from rwseg.models.base import Segmenter, solver_stats
from rwseg.models.device_local import map_examples
from rwseg.models.common import avg_pool, cross_entropy, subsample_labels

__all__ = ["GCRFModel"]


class GCRFModel(Segmenter):
    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
        super().__init__(config, num_classes, rngs=rngs)
        c = config.gcrf
        self.offsets = ops.bipartite_offsets(int(c.radius))
        self.downsample = int(c.crf_downsample)
        self.num_layers, self.tol, self.max_layers = int(c.num_layers), float(c.tol), int(c.max_layers)
        self.margin, self.aux_weight = float(c.margin), float(c.aux_weight)
        self.pretrain_steps, self.pretrain_weight = int(c.pretrain_steps), float(c.pretrain_weight)
        m = int(c.filters) or num_classes
        self.pairwise = nnx.Conv(config.model.features + 3, int(c.features), (1, 1), rngs=rngs)
        self.filters = nnx.Param(0.1 * jax.random.normal(rngs.params(), (int(c.features), m), jnp.float32))
        self.compat = nnx.Param(float(c.compat_init) * jnp.eye(num_classes, dtype=jnp.float32))

    def _crf_inputs(self, images):
        """(unary logits, similarity) at H/f: (B, h, w, K), (B, h, w, N)."""
        out = self.backbone(images)
        small = avg_pool(images, self.downsample)
        size, src, dst = small.shape[1:3], self.backbone.grid(images.shape[1:3]), pooled_grid(self.downsample)
        logits = upsample(out["logits"], size, src, dst)
        z = self.pairwise(jnp.concatenate([upsample(out["features"], size, src, dst), small], axis=-1))
        filters = self.filters[...]
        sim = jax.vmap(lambda zz: ops.pairwise_similarity(zz, filters, self.offsets))(z)
        return logits, sim

    def _gmf(self, logits, sim, num_layers):
        """GMF per image (device-local under a mesh): (y (B, h, w, K), converged (B, K) or None).

        ``num_layers`` unrolled layers (training) or to ``tol`` (``None``, evaluation,
        with the solver's ``converged`` flags).
        """
        c = ops.compatibility(self.compat[...])

        def run(r, s, cc):
            if num_layers is not None:
                return ops.gmf(r, s, cc, self.offsets, num_layers=num_layers), None
            y, info = ops.gmf(r, s, cc, self.offsets, tol=self.tol, max_layers=self.max_layers, return_info=True)
            return y, info.converged

        return map_examples(run, jax.nn.softmax(logits, axis=-1), sim, shared=(c,))

    def loss(self, batch, step):
        images, labels = batch["image"], batch["label"]
        logits, sim = self._crf_inputs(images)
        grid = pooled_grid(self.downsample)
        y = upsample(self._gmf(logits, sim, self.num_layers)[0], images.shape[1:3], grid)
        margin = jnp.mean(jax.vmap(lambda yy, l: ops.margin_loss(yy, l, self.margin))(y, labels))
        aux = cross_entropy(upsample(logits, images.shape[1:3], grid), labels)
        small = subsample_labels(labels, self.downsample, self.num_classes)
        pre = jnp.mean(jax.vmap(lambda s, l: ops.similarity_pretrain_loss(s, l, self.offsets))(sim, small))
        pre_w = jnp.where(step < self.pretrain_steps, self.pretrain_weight, 0.0).astype(margin.dtype)
        return margin + self.aux_weight * aux + pre_w * pre, {"margin": margin, "ce_unary": aux, "pretrain": pre}

    def infer(self, images):
        logits, sim = self._crf_inputs(images)
        y, converged = self._gmf(logits, sim, None)
        return upsample(y, images.shape[1:3], pooled_grid(self.downsample)), solver_stats(converged, y)
