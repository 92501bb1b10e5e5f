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
    """The model class registered for ``method``."""
    if method not in METHODS:
        raise ValueError(f"config.method: expected one of {sorted(METHODS)}, got {method!r}")
    module, name = METHODS[method].split(":")
    return getattr(importlib.import_module(module), name)


def dataset_statistics(config, label_maps) -> dict:
    """Constants computed from training label maps (B, H, W) int; {} for most methods."""
    cls = model_class(config.method)
    fn = getattr(cls, "dataset_statistics", None)
    return dict(fn(config, label_maps)) if fn is not None else {}


def build_model(config, num_classes: int, *, rngs: nnx.Rngs, statistics: dict | None = None):
    """Instantiate the model of ``config.method`` with freshly initialised parameters, computing in
    ``config.compute_dtype`` (:func:`rwseg.models.memory.set_compute_dtype`; float32 when absent)."""
    from rwseg.models.memory import set_compute_dtype

    cls = model_class(config.method)
    if getattr(cls, "dataset_statistics", None) is not None:
        if statistics is None:
            raise ValueError(f"statistics: method {config.method!r} needs dataset statistics, got None")
        model = cls(config, num_classes, rngs=rngs, statistics=statistics)
    else:
        model = cls(config, num_classes, rngs=rngs)
    return set_compute_dtype(model, config.get("compute_dtype", "float32"))
