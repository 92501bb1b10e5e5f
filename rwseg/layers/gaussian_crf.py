"""GCRF refinement layer: Gaussian mean-field inference over any network's logits.

Vemulapalli, Tuzel, Liu, Chellappa, "Gaussian Conditional Random Field Network for
Semantic Segmentation" (CVPR 2016): the softmax of the logits is the
unary term r; a pairwise network (a 1x1 conv over features and the image) gives pixel
embeddings z, learned filters give the similarities ``s_ij`` on a bipartite stencil
(:func:`rwseg.gcrf.pairwise_similarity`) and a learned ``C = R R^T`` the class
compatibility; Gaussian mean field (:func:`rwseg.gcrf.gmf`, eq. 2) solves
``(I + L_s ⊗ C) y = r``: unrolled layers in training, to a tolerance at test time.
Losses: the margin loss (eq. 6) on the output and the pairwise pretraining loss (eq. 7).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rwseg import gcrf as ops
from rwseg.layers import _inputs as I
from rwseg.layers.colour import check_colour_sigma
from rwseg.layers.info import exact_steps, solved
from rwseg.layers.grid import avg_pool, subsample_labels, to_image, to_working_grid
from rwseg.layers.device_local import map_examples
from rwseg.layers.memory import remat_enabled

__all__ = ["GaussianCRF"]


class GaussianCRF(nnx.Module):
    """Gaussian CRF / Gaussian mean field on logits (Vemulapalli et al. 2016, eq. 2, 6, 7).

    Args:
      num_classes: K, channels of the logits.
      feature_channels: channels of the optional features the pairwise network sees next
        to the image (e.g. decoder features; 0: the image only).
      embedding_channels: D, channels of the pairwise embeddings z.
      num_filters: M learned filters of the similarity (0: ``num_classes``, as the paper).
      radius: the bipartite window ``(2 radius + 1)^2`` (:func:`rwseg.gcrf.bipartite_offsets`).
      downsample: GMF runs at ``H / downsample x W / downsample`` (the paper: 8).
      num_steps: unrolled GMF layers in training (the paper: 5).
      tol: test-time GMF runs until a layer changes no entry by more than
        ``tol * max|r|``, at most ``max_iters`` layers.
      max_iters: the most GMF layers at test time.
      margin: T of the margin loss (eq. 6).
      compat_init: ``R = compat_init * I`` at initialisation.
      colour_sigma_init: ``0``: the pairwise network and filters start random (the paper).
        ``sigma > 0``: the similarity starts as the colour kernel
        ``s_ij = exp(-|I_i - I_j|^2 / (2 sigma^2))`` of the (average-pooled) image, sigma in
        the image's units (issue 26's "start from the classic"; DenseCRF's bilateral term
        without its spatial factor, which the window bounds): the pairwise conv maps the
        image channels to the first C embedding channels scaled by ``1 / (sqrt(2) sigma)``,
        features and bias start at 0, and the filters are the identity on those C channels,
        0 elsewhere. Needs ``embedding_channels`` and the number of filters >= C.
      eval_radius: the window at test time (``train=False``); ``None``: ``radius``. The
        similarity is pointwise (embeddings compared on the window's offsets), so a layer
        trained on one window can be solved on another (issue 26: a wider reach at test time).
      eval_downsample: the grid at test time; ``None``: ``downsample``.
      image_channels: channels of the image.
      rngs: parameter initialisation.

    Parameters: ``pairwise`` (1x1 conv), ``filters`` (D, M), ``compat`` (R, K x K).
    """

    def __init__(self, num_classes: int, *, feature_channels: int = 0, embedding_channels: int = 16,
                 num_filters: int = 0, radius: int = 3, downsample: int = 4, num_steps: int = 5,
                 tol: float = 1e-4, max_iters: int = 200, margin: float = 0.5, compat_init: float = 0.5,
                 colour_sigma_init: float = 0.0, eval_radius: int | None = None,
                 eval_downsample: int | None = None, image_channels: int = 3, rngs: nnx.Rngs):
        self.num_classes, self.downsample = int(num_classes), int(downsample)
        self.feature_channels, self.image_channels = int(feature_channels), int(image_channels)
        self.offsets = ops.bipartite_offsets(int(radius))
        self.eval_downsample = self.downsample if eval_downsample is None else int(eval_downsample)
        self.eval_offsets = self.offsets if eval_radius is None else ops.bipartite_offsets(int(eval_radius))
        self.num_steps, self.tol, self.max_iters = int(num_steps), float(tol), int(max_iters)
        self.margin = float(margin)
        m = int(num_filters) or self.num_classes
        d = int(embedding_channels)
        self.pairwise = nnx.Conv(self.feature_channels + self.image_channels, d, (1, 1), rngs=rngs)
        self.filters = nnx.Param(0.1 * jax.random.normal(rngs.params(), (d, m), jnp.float32))
        self.compat = nnx.Param(float(compat_init) * jnp.eye(self.num_classes, dtype=jnp.float32))
        if check_colour_sigma(colour_sigma_init):
            self._start_at_colour_kernel(float(colour_sigma_init), d, m)

    def _start_at_colour_kernel(self, sigma: float, d: int, m: int) -> None:
        """Set ``pairwise`` and ``filters`` so that :meth:`similarity` is the colour kernel of width
        ``sigma`` (``colour_sigma_init``): z = [image / (sqrt(2) sigma), 0, ...], F = [I_C; 0]."""
        c, f = self.image_channels, self.feature_channels
        for name, have in (("embedding_channels", d), ("num_filters", m)):
            if have < c:
                raise ValueError(f"{name}: colour_sigma_init needs at least the image's {c} channels, got {have}")
        kernel = jnp.zeros((1, 1, f + c, d), jnp.float32)  # input order: [features, image]
        eye = jnp.eye(c, dtype=jnp.float32)
        self.pairwise.kernel[...] = kernel.at[0, 0, f:, :c].set(eye / jnp.float32(math.sqrt(2.0) * sigma))
        self.pairwise.bias[...] = jnp.zeros((d,), jnp.float32)
        self.filters[...] = jnp.zeros((d, m), jnp.float32).at[:c, :c].set(eye)

    def _grid(self, train: bool):
        """(downsample, offsets) of GMF in training or at test time."""
        return (self.downsample, self.offsets) if train else (self.eval_downsample, self.eval_offsets)

    def similarity(self, image, features=None, *, features_grid=None, train: bool = False):
        """Pairwise similarities s of the pairwise network.

        Args:
          image: as for ``__call__``.
          features: as for ``__call__``.
          features_grid: as for ``__call__``.
          train: the training grid and window (``downsample``, ``radius``); ``False``: the
            test-time ones (``eval_downsample``, ``eval_radius``), as for ``__call__``.

        Returns:
          (B, H/f, W/f, N) symmetric similarities on the N offsets of the window (the
          bipartite stencil), f the grid's ``downsample``.
        """
        f, offsets = self._grid(train)
        b, h, w = I.check_image(image, channels=self.image_channels, downsample=f)
        small = avg_pool(image, f)
        if features is None:
            if self.feature_channels:
                raise ValueError(f"features: expected (B, h, w, {self.feature_channels}) features (the layer "
                                 "was built with feature_channels > 0), got None")
            z = self.pairwise(small)
        else:
            I.check_map("features", features, b, self.feature_channels, "feature_channels")
            feats = to_working_grid(features, (h, w), f, features_grid)
            z = self.pairwise(jnp.concatenate([feats, small], axis=-1))
        filters = self.filters[...]
        return jax.vmap(lambda zz: ops.pairwise_similarity(zz, filters, offsets))(z)

    def __call__(self, logits, image, features=None, *, train: bool = False, logits_grid=None,
                 features_grid=None, similarity=None, return_info: bool = False):
        """Mean-field marginals y of the CRF with unary ``softmax(logits)``.

        Args:
          logits: (B, h, w, K) float, any resolution, cells on ``logits_grid``.
          image: (B, H, W, C) float, H and W divisible by ``downsample`` (``eval_downsample``
            at test time).
          features: optional (B, h', w', feature_channels) on ``features_grid``.
          train: ``True``: ``num_steps`` unrolled GMF layers (reverse-mode differentiated) on
            the ``downsample`` grid and ``radius`` window; ``False``: GMF to ``tol``
            (``lax.while_loop``, implicit gradient), one per image, device-local under a mesh,
            on the ``eval_downsample`` grid and ``eval_radius`` window.
          logits_grid: cell placement of those maps (default: evenly tiling
            the image).
          features_grid: see ``logits_grid``.
          similarity: optional, :meth:`similarity` of the same inputs and ``train``, computed
            once for this call and :meth:`pretrain_loss` in a training step.
          return_info: also return a :class:`rwseg.layers.RefinementInfo`.

        Returns:
          (B, H, W, K) refined scores y (argmax = prediction; ``(y, info)`` with
          ``return_info``).
        """
        f, offsets = self._grid(train)
        b, h, w = I.check_image(image, channels=self.image_channels, downsample=f)
        I.check_map("logits", logits, b, self.num_classes, "num_classes")
        unary = jax.nn.softmax(to_working_grid(logits, (h, w), f, logits_grid), axis=-1)
        sim = similarity if similarity is not None else self.similarity(image, features, features_grid=features_grid,
                                                                        train=train)
        compat = ops.compatibility(self.compat[...])
        if train:
            remat = remat_enabled()  # config.remat: checkpoint each unrolled GMF layer
            y = map_examples(lambda r, s, c: ops.gmf(r, s, c, offsets, num_steps=self.num_steps, remat=remat),
                             unary, sim, shared=(compat,))
            info = exact_steps(b, self.num_steps)
        else:
            y, si = map_examples(lambda r, s, c: ops.gmf(r, s, c, offsets, tol=self.tol,
                                                         max_iters=self.max_iters, return_info=True),
                                 unary, sim, shared=(compat,))
            info = solved(si.converged, si.iterations, si.residual, y)
        y = to_image(y, (h, w), f)
        return (y, info) if return_info else y

    def margin_loss(self, refined, labels):
        """The margin loss of eq. 6 (margin T = ``margin``).

        Args:
          refined: (B, H, W, K) output of ``__call__``.
          labels: (B, H, W) int, 255 / negative ignored.

        Returns:
          Scalar, the batch mean of :func:`rwseg.gcrf.margin_loss`.
        """
        I.check_labels("labels", labels, refined.shape[:3])
        return jnp.mean(jax.vmap(lambda y, l: ops.margin_loss(y, l, margin=self.margin))(refined, labels))

    def pretrain_loss(self, image, labels, features=None, *, features_grid=None, similarity=None):
        """The pairwise pretraining loss of eq. 7.

        Args:
          image: as for ``__call__``.
          features: as for ``__call__``.
          features_grid: as for ``__call__``.
          similarity: as for ``__call__`` with ``train=True`` (the training grid and window).
          labels: (B, H, W) int, block-majority subsampled to the CRF grid.

        Returns:
          Scalar, the batch mean of :func:`rwseg.gcrf.similarity_pretrain_loss`.
        """
        I.check_labels("labels", labels, I.check_image(image, channels=self.image_channels,
                                                        downsample=self.downsample))
        sim = similarity if similarity is not None else self.similarity(image, features, features_grid=features_grid,
                                                                        train=True)
        small = subsample_labels(labels, self.downsample, self.num_classes)
        return jnp.mean(jax.vmap(lambda s, l: ops.similarity_pretrain_loss(s, l, self.offsets))(sim, small))
