"""The backbones a model can be built on, chosen by ``config.model.backbone``.

* ``"compact"`` (default) — rwseg's own small CNN (:class:`rwseg.models.backbone.Backbone`),
  built from ``config.model.{width, depth, aspp_rates, features, norm}``.
* ``"resnet50"`` / ``"resnet101"`` — DeepLab-ResNets (:class:`rwseg.models.backbones.resnet.ResNet`
  with ``depth`` 50 / 101), built from the section ``config.model.resnet``, which holds
  ResNet's constructor arguments under their names (every one but ``num_classes``, given by
  the dataset, ``depth``, given by the backbone's name, and ``in_channels``, the model's
  images); absent ones take the
  constructor's defaults::

      config.model.backbone = "resnet101"
      config.model.resnet = dict(output_stride=8, head="aspp", aspp_rates=(6, 12, 18, 24))
      config.model.pretrained = "/path/to/resnet101-63fe2227.pth"   # or a .safetensors file

``config.model.pretrained`` (a torchvision / timm ResNet checkpoint) is loaded into the
encoder when a run starts (:func:`rwseg.models.backbones.load_torch_weights`; the trainer
prints its :class:`ImportReport`). Every backbone gives the same interface: ``__call__(images)
-> {"stem", "features", "logits", ...}``, ``grid(size_hw)``, ``stem_channels``,
``num_features``, ``num_classes``.
"""

from __future__ import annotations

import inspect
import numbers
import pathlib

from flax import nnx

from rwseg.models.backbone import Backbone
from rwseg.models.backbones.resnet import BLOCKS, HEADS, OUTPUT_STRIDES, ResNet, ResNetEncoder, level_grid
from rwseg.models.backbones.weights import (ImportReport, WeightImportError, load_torch_weights,
                                            read_state_dict)

__all__ = ["BACKBONES", "RESNET_SECTION", "build_backbone", "backbone_channels", "resnet_kwargs", "check_model_config", "ResNet",
           "ResNetEncoder", "level_grid", "load_torch_weights", "read_state_dict", "ImportReport",
           "WeightImportError", "CHECKPOINT_SUFFIXES"]

BACKBONES = {"compact": None, "resnet50": 50, "resnet101": 101}  # name -> ResNet depth
RESNET_SECTION = "resnet"  # config.model.resnet: ResNet's constructor arguments
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# ResNet's arguments a config may set (num_classes: the dataset's; depth: the backbone's name;
# in_channels: the model's images)
_FIXED = ("num_classes", "depth", "in_channels", "rngs")


def _resnet_options() -> tuple[str, ...]:
    return tuple(n for n in inspect.signature(ResNet.__init__).parameters if n not in ("self",) + _FIXED)


def resnet_kwargs(model_config) -> dict:
    """ResNet's keyword arguments from ``config.model`` (``depth`` from ``config.model.backbone``).

    Args:
      model_config: ``config.model`` with ``backbone`` ``"resnet50"`` / ``"resnet101"`` and an
        optional ``resnet`` section.

    Returns:
      ``{"depth": 50 | 101, **config.model.resnet}`` (tuples for list values).

    Raises:
      ValueError: naming an unknown ``config.model.resnet`` key.
    """
    name = model_config.backbone
    section = dict(model_config.get(RESNET_SECTION, None) or {})  # an optional section
    unknown = sorted(set(section) - set(_resnet_options()))
    if unknown:
        raise ValueError(f"config.model.{RESNET_SECTION}: unknown keys {unknown} (ResNet's arguments: "
                         f"{', '.join(_resnet_options())})")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}
    return {"depth": BACKBONES[name], **kw}


def build_backbone(model_config, num_classes: int, *, in_channels: int = 3, rngs: nnx.Rngs):
    """The backbone ``config.model`` selects, freshly initialised.

    Args:
      model_config: ``config.model`` (see the module docstring).
      num_classes: logits channels.
      in_channels: channels of the images (the model's, not a config key).
      rngs: the initialisers' keys.

    Returns:
      A :class:`rwseg.models.backbone.Backbone` or a :class:`ResNet`.

    Raises:
      ValueError: an unknown ``config.model.backbone`` or ``config.model.resnet`` key.
    """
    name = model_config.backbone
    if name not in BACKBONES:
        raise ValueError(f"config.model.backbone: expected one of {sorted(BACKBONES)}, got {name!r}")
    if name == "compact":
        m = model_config
        return Backbone(num_classes, width=m.width, depth=m.depth, aspp_rates=tuple(m.aspp_rates),
                        features=m.features, norm=m.norm, in_channels=in_channels, rngs=rngs)
    return ResNet(num_classes, **resnet_kwargs(model_config), in_channels=in_channels, rngs=rngs)


def backbone_channels(model_config) -> tuple[int, int]:
    """The channels of the backbone ``config.model`` selects, without building it.

    The refinement layers' channel arguments (``SUPPLIED`` of the models) come from here;
    :class:`rwseg.models.base.Segmenter` checks them against the built backbone's
    ``stem_channels`` / ``num_features``.

    Args:
      model_config: ``config.model`` (see the module docstring).

    Returns:
      ``(stem_channels, num_features)``: channels of the backbone's ``stem`` and ``features``.

    Raises:
      ValueError: an unknown ``config.model.backbone`` or ``config.model.resnet`` key.
    """
    name = model_config.backbone
    if name not in BACKBONES:
        raise ValueError(f"config.model.backbone: expected one of {sorted(BACKBONES)}, got {name!r}")
    if name == "compact":
        return int(model_config.width), int(model_config.features)
    kw = resnet_kwargs(model_config)
    defaults = {n: p.default for n, p in inspect.signature(ResNet.__init__).parameters.items()}
    get = lambda n: kw.get(n, defaults[n])  # noqa: E731
    # the encoder ends on layer4: 512 planes x the bottleneck's expansion 4; ASPP-v2 sums its
    # branches' logits and exposes layer4 as the features, the other heads their own width
    return ResNet.STEM_CHANNELS, (ResNetEncoder.OUT_CHANNELS if get("head") == "aspp" else int(get("head_channels")))


def _int(v, lo):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo


def check_model_config(config) -> list[str]:
    """The problems of ``config.model``'s backbone keys, one line each naming the ``config.`` key.

    Checks ``model.backbone``, ``model.pretrained`` (an existing checkpoint file, only on a
    ResNet backbone; required with ``init_from`` on one, the frozen BatchNorm affine being
    a constant of the checkpoint, not a parameter ``init_from`` copies) and the
    ``model.resnet`` section (known keys, valid values, GroupNorm channel counts).

    Args:
      config: a training config.

    Returns:
      A list of error lines (empty when fine).
    """
    errors = []
    model = config.get("model", None)
    if model is None:
        return errors
    missing = [f"config.model.{k}: missing (expected {d})" for k, d in
               (("backbone", "one of " + ", ".join(repr(b) for b in BACKBONES)), ("pretrained", "a path or ''"))
               if k not in model]
    if missing:
        return missing
    name = model.backbone
    if name not in BACKBONES:
        return [f"config.model.backbone: expected one of {', '.join(repr(b) for b in BACKBONES)}, got {name!r}"]
    pretrained = model.pretrained
    if not isinstance(pretrained, str):
        errors.append(f"config.model.pretrained: expected a path (a string), got {pretrained!r}")
    elif pretrained:
        path = pathlib.Path(pretrained).expanduser()
        if name == "compact":
            errors.append(f"config.model.pretrained: expected '' with config.model.backbone 'compact' (pretrained "
                          f"weights load into 'resnet50' / 'resnet101'), got {pretrained!r}")
        elif path.suffix not in CHECKPOINT_SUFFIXES:
            errors.append(f"config.model.pretrained: expected a {' / '.join(CHECKPOINT_SUFFIXES)} checkpoint, "
                          f"got {pretrained!r}")
        elif not path.is_file():
            errors.append(f"config.model.pretrained: expected an existing checkpoint file, got {pretrained!r}")
    if name == "compact":
        if model.get(RESNET_SECTION, None) is not None:
            errors.append(f"config.model.{RESNET_SECTION}: expected no section with config.model.backbone 'compact'")
        return errors
    if config.get("init_from", "") and not pretrained:
        errors.append("config.model.pretrained: expected the checkpoint the base run started from with "
                      "config.init_from on a ResNet backbone (its frozen BatchNorm is not a parameter), got ''")
    try:
        kw = resnet_kwargs(model)
    except ValueError as e:
        return errors + [str(e)]
    key = f"config.model.{RESNET_SECTION}"
    checks = {
        "output_stride": (lambda v: v in OUTPUT_STRIDES, f"one of {OUTPUT_STRIDES}"),
        "head": (lambda v: v in HEADS, "one of " + ", ".join(repr(h) for h in HEADS)),
        "aspp_rates": (lambda v: isinstance(v, tuple) and len(v) > 0 and all(_int(r, 1) for r in v),
                       "a non-empty tuple of ints >= 1"),
        "head_channels": (lambda v: _int(v, 1), "an int >= 1"),
        "low_level_channels": (lambda v: _int(v, 1), "an int >= 1"),
        "head_norm": (lambda v: v in ("group", "none"), "'group' or 'none'"),
        "blocks": (lambda v: v is None or (isinstance(v, tuple) and len(v) == 4 and all(_int(b, 1) for b in v)),
                   "None or 4 ints >= 1"),
        "in_channels": (lambda v: _int(v, 1), "an int >= 1"),
    }
    for option, value in kw.items():
        if option in checks and not checks[option][0](value):
            errors.append(f"{key}.{option}: expected {checks[option][1]}, got {value!r}")
    defaults = {n: p.default for n, p in inspect.signature(ResNet.__init__).parameters.items()}
    get = lambda n: kw.get(n, defaults[n])  # noqa: E731
    if get("head_norm") == "group" and get("head") != "aspp":
        for option in ("head_channels",) + (("low_level_channels",) if get("head") == "deeplabv3plus" else ()):
            v = get(option)
            if _int(v, 1) and v >= 8 and v % 8:
                errors.append(f"{key}.{option}: expected < 8 or a multiple of 8 (GroupNorm with min(8, C) groups; "
                              f"or {key}.head_norm='none'), got {v}")
    return errors
