"""The segmentation loss shared by the models (batched, channels last); the grids and
resampling helpers the models use are :mod:`rwseg.layers.grid`."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from rwseg._numerics import masked_mean
from rwseg.constants import IGNORE_INDEX

__all__ = ["cross_entropy", "probability_cross_entropy"]


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX):
    """Softmax cross-entropy averaged over the non-ignored pixels of the whole batch.

    The mean is over the *global* batch, so a data-parallel step gives the same value (and
    gradient) as one device. The per-pixel loss is optax's
    ``softmax_cross_entropy_with_integer_labels`` with the valid pixels as ``where``.

    Args:
      logits: (B, H, W, K) float.
      labels: (B, H, W) int (``ignore_index`` or negative = ignored).
      ignore_index: the label of pixels that count nowhere.

    Returns:
      A scalar (0 when no pixel is labelled).
    """
    num_classes = logits.shape[-1]
    valid = (labels >= 0) & (labels != ignore_index) & (labels < num_classes)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0), where=valid)
    return masked_mean(nll, valid)


def probability_cross_entropy(probs, labels, ignore_index: int = IGNORE_INDEX):
    """:func:`cross_entropy` of class probabilities (a refinement's output) instead of logits.

    ``-log p[label]`` averaged as :func:`cross_entropy` averages (the log is taken of the
    probabilities floored at the dtype's smallest normal number, so a zero probability
    costs a large finite loss, not infinity). Probabilities that do not sum to 1 are
    normalised first (the softmax of their log).

    Args:
      probs: (B, H, W, K) float, >= 0.
      labels: (B, H, W) int (``ignore_index`` or negative = ignored).
      ignore_index: the label of pixels that count nowhere.

    Returns:
      A scalar (0 when no pixel is labelled).
    """
    tiny = jnp.finfo(jnp.result_type(probs, jnp.float32)).tiny
    return cross_entropy(jnp.log(jnp.maximum(probs, tiny)), labels, ignore_index)
