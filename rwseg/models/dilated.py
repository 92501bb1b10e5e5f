"""Dilated affinity model (seed 004): an affinity head parallel to the class logits.

Training: segmentation cross-entropy + ``beta`` x the reweighted focal affinity loss
(:func:`rwseg.dilated.affinity_loss`); evaluation: affinity propagation refinement of
the upsampled class probabilities (:func:`rwseg.dilated.propagate`). The head is a 1x1
conv on the 1/8 decoder features giving 8·|R| logits, bilinearly upsampled to the
image (with ``use_stem``, the head sees the upsampled decoder features concatenated
with the full-resolution stem features — a DeepLabv3+-style decoder; at 64 px the 1/8
map alone is 8x8 and cannot place boundaries); its bias starts at the dataset prior (:func:`rwseg.dilated.prior_bias`), which
needs the neighbour-category frequencies of the training labels — computed once by
:meth:`DilatedAffinityModel.dataset_statistics` and stored with the model.

Config ``config.dilated``: ``rates`` (pixels at full resolution; ints or (r1, r2)
pairs), ``use_stem``, ``beta``, ``gamma``, ``lam``, ``mu``, ``iterations``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwseg import dilated as ops
from rwseg.models.backbone import upsample
from rwseg.models.base import Segmenter, Statistic, no_solves
from rwseg.models.common import IGNORE_INDEX, cross_entropy

__all__ = ["DilatedAffinityModel"]


def _rates(config):
    return tuple(tuple(r) if isinstance(r, (tuple, list)) else int(r) for r in config.dilated.rates)


class DilatedAffinityModel(Segmenter):
    def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs, statistics: dict):
        super().__init__(config, num_classes, rngs=rngs)
        c = config.dilated
        self.rates = _rates(config)
        self.beta, self.gamma = float(c.beta), float(c.gamma)
        self.lam, self.mu, self.iterations = float(c.lam), float(c.mu), int(c.iterations)
        freq = np.asarray(statistics["frequencies"], np.float32)
        if freq.shape != (len(self.rates), 9):
            raise ValueError(f"statistics['frequencies']: expected shape ({len(self.rates)}, 9) for rates "
                             f"{self.rates}, got {freq.shape}")
        self.frequencies = Statistic(jnp.asarray(freq))
        bias = jnp.repeat(ops.prior_bias(jnp.asarray(freq)), 8).astype(jnp.float32)
        self.use_stem = bool(c.use_stem)
        cin = config.model.features + (config.model.width if self.use_stem else 0)
        self.affinity_head = nnx.Conv(cin, 8 * len(self.rates), (1, 1), bias_init=lambda *_: bias, rngs=rngs)

    @staticmethod
    def dataset_statistics(config, label_maps) -> dict:
        """{"frequencies": (|R|, 9) float32} from training label maps (B, H, W)."""
        table = ops.category_frequencies(list(np.asarray(label_maps)), _rates(config), IGNORE_INDEX)
        return {"frequencies": table.astype(np.float32)}

    def outputs(self, images):
        """(class scores (B, H, W, K), affinity logits (B, H, W, 8·|R|)), full resolution."""
        out = self.backbone(images)
        size = images.shape[1:3]
        grid = self.backbone.grid(size)
        if self.use_stem:  # decoder-style: upsampled 1/8 features + full-resolution stem features
            feats = jnp.concatenate([upsample(out["features"], size, grid), out["stem"]], axis=-1)
            return upsample(out["logits"], size, grid), self.affinity_head(feats)
        return upsample(out["logits"], size, grid), upsample(self.affinity_head(out["features"]), size, grid)

    def loss(self, batch, step):
        logits, aff = self.outputs(batch["image"])
        ce = cross_entropy(logits, batch["label"])
        freq = self.frequencies[...]
        aff_loss = jnp.mean(jax.vmap(
            lambda a, l: ops.affinity_loss(a, l, self.rates, freq, gamma=self.gamma))(aff, batch["label"]))
        return ce + self.beta * aff_loss, {"ce": ce, "affinity": aff_loss}

    def infer(self, images):
        logits, aff = self.outputs(images)
        probs = jax.nn.softmax(logits, axis=-1)
        refine = lambda p, a: ops.propagate(p, a, self.rates, lam=self.lam, mu=self.mu, iterations=self.iterations)
        return jax.vmap(refine)(probs, aff), no_solves(images.shape[0])
