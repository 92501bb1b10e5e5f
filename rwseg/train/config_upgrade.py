"""The one upgrade of a config written by an older rwseg (a workdir's ``config.json`` or
``config_history.jsonl``) to the current keys, applied once, where a saved config is read
(:func:`rwseg.train.workdir.previous_config`: resume, evaluate, ``init_from``).

Two kinds of change happened to the configs:

* a method's layer options moved into ``config.<method>.layer`` under the layer's own
  argument names (:data:`RENAMED`; e.g. ``gcrf.num_layers`` -> ``gcrf.layer.num_steps``);
* keys were added; an older run's config lacks them, and its runs behaved as the value in
  :data:`ABSENT` (e.g. ``data.flip`` absent = flipped, as the pipeline always did), or as
  another key's value, :data:`ABSENT_SAME_AS` (e.g. ``rwn.layer.feature_theta_init``
  absent = ``rwn.layer.theta_init``, the one value that started every channel).

Code downstream reads every key directly: no ``config.get(key, default)`` elsewhere.
"""

from __future__ import annotations

import copy

from rwseg.train.config_check import _MISSING, _get  # the dotted-key lookup check_config uses

__all__ = ["RENAMED", "ABSENT", "ABSENT_SAME_AS", "upgrade_config"]

# method -> {old key of config.<method>: new key under config.<method>}
RENAMED = {
    "rwn": {"walk_downsample": "layer.downsample", "train_radius": "layer.train_radius",
            "eval_radius": "layer.eval_radius", "alpha": "layer.alpha", "theta_init": "layer.theta_init",
            "tol": "layer.tol", "max_iters": "layer.max_iters"},
    "rawks": {"width": "layer.boundary_channels", "depth": "layer.boundary_depth", "downsample": "layer.downsample",
              "alpha": "layer.temperature", "max_boundary": "layer.max_boundary", "tol": "layer.tol",
              "max_iters": "layer.max_iters"},
    "spn": {"width": "layer.guidance_channels", "depth": "layer.guidance_depth", "downsample": "layer.downsample"},
    "gcrf": {"radius": "layer.radius", "crf_downsample": "layer.downsample", "features": "layer.embedding_channels",
             "filters": "layer.num_filters", "num_layers": "layer.num_steps", "tol": "layer.tol",
             "max_layers": "layer.max_iters", "margin": "layer.margin", "compat_init": "layer.compat_init"},
    "dilated": {"rates": "layer.rates", "decoder_width": "layer.decoder_width", "decoder_depth": "layer.decoder_depth",
                "gamma": "layer.gamma", "lam": "layer.lam", "mu": "layer.mu", "iterations": "layer.num_steps"},
}

# dotted key -> what its absence meant (keys added after the first runs); a method's keys
# apply to that method's configs only
ABSENT = {
    "optimizer.max_nonfinite_skips": 0,
    "optimizer.method_lr_mult": 1.0,
    "allow_config_change": False,
    "init_from": "",
    "init_params": "backbone",
    "freeze_backbone": False,
    "freeze_method": False,
    "data.scale_range": [0.75, 1.25],
    "data.flip": True,
    "data.color_jitter": [0.0, 0.0, 0.0],
    "data.train_labels": "dense",
    "optimizer.schedule": "cosine",
    "optimizer.power": 0.9,
    "model.backbone": "compact",
    "model.pretrained": "",
    "compute_dtype": "float32",
    "remat": False,
    "microbatches": 1,
    "spn.guidance_input": "image",
    "spn.layer.merge": "max",
    "spn.layer.implementation": "auto",
    "spn.layer.colour_sigma_init": 0.0,
    "spn.layer.colour_gate_init": 0.99,
    "dilated.layer.decoder_width": 0,
    "dilated.layer.decoder_depth": 0,
    "dilated.layer.colour_sigma_init": 0.0,
    "dilated.refined_weight": 0.0,
    "rawks.targets": "soft",
    "gcrf.layer.colour_sigma_init": 0.0,
    "rwn.layer.eval_rates": [],
    "rwn.layer.walk_on": "logits",
}

# dotted key -> the dotted key whose value its absence meant (split from one option into two;
# applied after RENAMED, so the source key has its current name; a method's keys as in ABSENT)
ABSENT_SAME_AS = {
    "rwn.layer.feature_theta_init": "rwn.layer.theta_init",
    "gcrf.layer.eval_radius": "gcrf.layer.radius",
    "gcrf.layer.eval_downsample": "gcrf.layer.downsample",
}


def upgrade_config(tree: dict) -> dict:
    """A saved config (nested dict, as JSON) in the current keys; a current one is returned unchanged.

    Args:
      tree: the config as a nested dict (``json.loads`` of ``config.json``).

    Returns:
      A new nested dict: the method's old option names moved to ``<method>.layer`` under the
      layer's names (:data:`RENAMED`), and the keys added since filled with what their
      absence meant (:data:`ABSENT_SAME_AS`, then :data:`ABSENT`).
    """
    tree = copy.deepcopy(dict(tree))
    method = tree.get("method")
    section = tree.get(method)
    if method in RENAMED and isinstance(section, dict) and "layer" not in section:
        layer = section["layer"] = {}
        for old, new in RENAMED[method].items():
            if old in section:
                layer[new.split(".", 1)[1]] = section.pop(old)
    for key, source in ABSENT_SAME_AS.items():
        if key.split(".")[0] == method and _get(tree, source) is not _MISSING:
            _set_default(tree, key, _get(tree, source))
    for key, value in ABSENT.items():
        if key.split(".")[0] in RENAMED and key.split(".")[0] != method:
            continue
        _set_default(tree, key, value)
    return tree


def _set_default(tree: dict, key: str, value) -> None:
    """Set a dotted key of a nested dict to a copy of ``value`` where it is absent."""
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node.setdefault(last, copy.deepcopy(value))
