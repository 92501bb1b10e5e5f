"""Refinement layers (Flax NNX) that add an affinity method to the logits of any network.

Each layer takes the network's logits ``(B, h, w, K)`` at any resolution (and where they
lie, ``logits_grid``, default: evenly tiling the image), the image ``(B, H, W, 3)`` and,
where the method uses them, optional features; options are explicit keyword arguments.
``return_info=True`` adds a :class:`RefinementInfo` (solves, non-converged examples,
iterations, residuals). Per-example solvers run through
:func:`rwseg.layers.device_local.map_examples` (device-local under a mesh).

- :class:`SpatialPropagation` — SPN (Liu et al. 2017): guidance network + 4-direction propagation.
- :class:`RandomWalkRefinement` — RWN (Bertasius et al. 2017): affinities + random walk;
  ``affinity_loss``.
- :class:`GaussianCRF` — GCRF / GMF (Vemulapalli et al. 2016): ``margin_loss``, ``pretrain_loss``.
- :class:`DilatedAffinity` — affinity head, ``affinity_loss`` (focal) and affinity propagation.
- :class:`RandomWalkLabelPropagation` — RAWKS (Vernaza & Chandraker 2017): boundary network,
  hitting probabilities of scribbles, ``loss`` (eq. 11).

rwseg's method models (:mod:`rwseg.models`) are rwseg's backbone plus one of these layers.
"""

from rwseg.layers.dilated_affinity import DilatedAffinity
from rwseg.layers.gaussian_crf import GaussianCRF
from rwseg.layers.info import RefinementInfo
from rwseg.layers.label_propagation import RandomWalkLabelPropagation
from rwseg.layers.random_walk import RandomWalkRefinement
from rwseg.layers.spatial_propagation import SpatialPropagation

__all__ = ["SpatialPropagation", "RandomWalkRefinement", "GaussianCRF", "DilatedAffinity",
           "RandomWalkLabelPropagation", "RefinementInfo"]
