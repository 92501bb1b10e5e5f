"""Segmentation models in Flax NNX: the baseline and the five methods over one backbone.

``build_model(config, num_classes, rngs=..., statistics=None)`` picks the class from
``config.method`` (see :data:`METHODS`); configs only switch. Each model implements
``loss(batch, step)``, ``infer(images)`` and ``predict(images, return_info=False)``
(see :mod:`rwseg.models.base`).
``dataset_statistics(config, labels)`` computes the constants a method needs from
training label maps (only ``dilated`` needs any) before the model is built.
"""

from __future__ import annotations

import importlib

from flax import nnx

__all__ = ["METHODS", "build_model", "model_class", "dataset_statistics"]

# method name -> "module:Class" (imported lazily, so one method's missing operator
# module does not break the others)
METHODS = {
    "baseline": "rwseg.models.base:Baseline",
    "rwn": "rwseg.models.rwn:RWNModel",
    "rawks": "rwseg.models.rawks:RAWKSModel",
    "spn": "rwseg.models.spn:SPNModel",
    "gcrf": "rwseg.models.gcrf:GCRFModel",
    "dilated": "rwseg.models.dilated:DilatedAffinityModel",
}


def model_class(method: str):
    """The model class registered for a method.

    Args:
      method: a name of :data:`METHODS`.

    Returns:
      The :class:`rwseg.models.base.Segmenter` subclass (imported on first use).

    Raises:
      ValueError: ``method`` is not registered (the message names ``config.method``).
    """
    if method not in METHODS:
        raise ValueError(f"config.method: expected one of {sorted(METHODS)}, got {method!r}")
    module, name = METHODS[method].split(":")
    return getattr(importlib.import_module(module), name)


def dataset_statistics(config, label_maps) -> dict:
    """Constants a method needs from training label maps, computed before the model is built.

    Args:
      config: a training config (``config.method`` picks the model class).
      label_maps: (B, H, W) int training labels.

    Returns:
      The model class's ``dataset_statistics(config, label_maps)`` (dilated:
      ``{"frequencies": (|R|, 9)}``), ``{}`` for methods without any.
    """
    cls = model_class(config.method)
    fn = getattr(cls, "dataset_statistics", None)
    return dict(fn(config, label_maps)) if fn is not None else {}


def build_model(config, num_classes: int, *, rngs: nnx.Rngs, statistics: dict | None = None):
    """Instantiate the model of ``config.method`` with freshly initialised parameters, computing in
    ``config.compute_dtype`` (:func:`rwseg.layers.convs.set_compute_dtype`).

    Args:
      config: a training config (``config.model``, ``config.<method>``).
      num_classes: K, channels of the logits.
      rngs: parameter initialisation.
      statistics: the :func:`dataset_statistics` of a method that needs them.

    Returns:
      The model (an ``nnx.Module``, :class:`rwseg.models.base.Segmenter`).

    Raises:
      ValueError: the method needs statistics and none are given.
    """
    from rwseg.layers.convs import set_compute_dtype

    cls = model_class(config.method)
    if getattr(cls, "dataset_statistics", None) is not None:
        if statistics is None:
            raise ValueError(f"statistics: method {config.method!r} needs dataset statistics, got None")
        model = cls(config, num_classes, rngs=rngs, statistics=statistics)
    else:
        model = cls(config, num_classes, rngs=rngs)
    return set_compute_dtype(model, config.compute_dtype)
