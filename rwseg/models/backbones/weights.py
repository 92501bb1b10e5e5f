"""Pretrained ResNet weights from a torchvision or timm checkpoint into rwseg's :class:`ResNetEncoder`.

A checkpoint is a state dict (``{name: tensor}``) of torchvision's ``resnet50`` / ``resnet101``
(or timm's, whose ResNets use the same names): a ``.pth`` / ``.pt`` file (read with torch,
imported only then) or a ``.safetensors`` file (read with the ``safetensors`` package alone, as
numpy: no torch needed), or the dict itself. A dict wrapped as ``{"state_dict": ...}`` or
``{"model": ...}`` and names prefixed ``module.`` (DataParallel) are unwrapped.

Conversion, per torch name:

* ``<conv>.weight`` (O, I, kh, kw) -> the conv's ``kernel`` (kh, kw, I, O) (OIHW -> HWIO);
* ``<bn>.{weight, bias, running_mean, running_var}`` -> the frozen BatchNorm's
  ``scale = weight / sqrt(running_var + eps)`` and ``bias = bias - running_mean * scale``
  (computed in float64), ``eps`` = torch's default 1e-5;
* ``fc.*`` (the ImageNet classifier) and ``*.num_batches_tracked`` are not used.

Every encoder array must be in the checkpoint with its exact shape, and the checkpoint may
hold nothing else (but the unused names above): otherwise :class:`WeightImportError` names
each offending key (and the expected and found shapes) — e.g. a ResNet-101 checkpoint for a
ResNet-50 (``layer3.6.conv1.weight`` not in the model) or a deep-stem ``resnet50d``.

:func:`load_torch_weights` writes the arrays into a model in place and returns an
:class:`ImportReport`: the arrays loaded, the model's arrays left freshly initialised (the
head, the method's own layers) and the checkpoint's names not used.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwseg.models.backbones.resnet import LEVELS, FrozenAffine, FrozenBatchNorm, ResNet, ResNetEncoder

__all__ = ["WeightImportError", "ImportReport", "read_state_dict", "encoder_arrays", "load_torch_weights",
           "BN_EPS", "UNUSED"]

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, torchvision's and timm's ResNets
UNUSED = (re.compile(r"^fc\.(weight|bias)$"), re.compile(r"(^|\.)num_batches_tracked$"))


class WeightImportError(ValueError):
    """The checkpoint does not fit the model (the message names every offending key)."""


@dataclasses.dataclass(frozen=True)
class ImportReport:
    """What :func:`load_torch_weights` did.

    Attributes:
      source: where the weights came from.
      loaded: the model's arrays set from the checkpoint (paths such as
        ``backbone/encoder/layer1/0/conv1/kernel``).
      initialised: the model's arrays left as initialised (the head, the method's layers).
      unused: the checkpoint's names not used (``fc.*``, ``*.num_batches_tracked``).
    """

    source: str
    loaded: tuple[str, ...]
    initialised: tuple[str, ...]
    unused: tuple[str, ...]

    def summary(self) -> str:
        """One line per group: counts and the top-level modules of the fresh arrays."""
        fresh = sorted({"/".join(p.split("/")[:2]) for p in self.initialised})
        return (f"{len(self.loaded)} arrays loaded from {self.source}; {len(self.initialised)} freshly initialised "
                f"({', '.join(fresh) or 'none'}); checkpoint entries not used: {len(self.unused)} "
                f"({', '.join(self.unused[:4])}{', ...' if len(self.unused) > 4 else ''})")


def _to_numpy(value):
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def read_state_dict(source) -> tuple[dict, str]:
    """The checkpoint as ``{name: numpy array}`` and a description of where it came from.

    Args:
      source: a ``.safetensors`` file (read with ``safetensors.numpy``), a ``.pth`` / ``.pt`` /
        ``.bin`` file (``torch.load(..., weights_only=True)``), or a dict of arrays / tensors.

    Returns:
      (state dict, description); ``{"state_dict": d}`` / ``{"model": d}`` wrappers and
      ``module.`` prefixes removed.

    Raises:
      FileNotFoundError: naming a missing file. ImportError: naming the package a file needs.
    """
    if isinstance(source, dict):
        state, where = source, "a state dict"
    else:
        path = pathlib.Path(os.fspath(source)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained checkpoint: no file {path}")
        where = str(path)
        if path.suffix == ".safetensors":
            try:
                from safetensors.numpy import load_file
            except ImportError as e:
                raise ImportError(f"reading {path} needs the `safetensors` package (pip install safetensors)") from e
            state = load_file(str(path))
        else:
            try:
                import torch
            except ImportError as e:
                raise ImportError(f"reading {path} needs torch (pip install torch; or convert it to .safetensors "
                                  "where torch is installed)") from e
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightImportError(f"pretrained checkpoint {where}: expected a state dict, got {type(state).__name__}")
    out = {}
    for name, value in state.items():
        out[name[len("module."):] if name.startswith("module.") else name] = _to_numpy(value)
    return out, where


def _torch_layout(encoder: ResNetEncoder):
    """{torch name prefix: module} of every conv and frozen BatchNorm of the encoder."""
    modules = {"conv1": encoder.conv1, "bn1": encoder.bn1}
    for level in LEVELS[1:]:
        for i, block in enumerate(getattr(encoder, level)):
            p = f"{level}.{i}"
            for j in (1, 2, 3):
                modules[f"{p}.conv{j}"], modules[f"{p}.bn{j}"] = getattr(block, f"conv{j}"), getattr(block, f"bn{j}")
            if block.downsample is not None:
                modules[f"{p}.downsample.0"], modules[f"{p}.downsample.1"] = block.downsample
    return modules


def encoder_arrays(encoder: ResNetEncoder, state: dict, *, where: str = "the checkpoint") -> dict:
    """The converted arrays of every encoder variable, checked against the encoder's shapes.

    Args:
      encoder: the :class:`ResNetEncoder` the arrays are for (its shapes are the reference).
      state: ``{torch name: numpy array}`` (:func:`read_state_dict`).
      where: the checkpoint's description, for the error message.

    Returns:
      ``{(module, attribute): float32 array}``: conv ``kernel`` in HWIO, BatchNorm ``scale``
      and ``bias`` folded from the running statistics.

    Raises:
      WeightImportError: naming every missing, unexpected or mis-shaped key (expected vs found).
    """
    problems, arrays, used = [], {}, set()

    def take(name, shape):
        if name not in state:
            problems.append(f"{name}: missing (expected shape {shape})")
            return None
        used.add(name)
        value = state[name]
        if tuple(value.shape) != tuple(shape):
            problems.append(f"{name}: expected shape {tuple(shape)}, got {tuple(value.shape)}")
            return None
        return np.asarray(value, np.float64)

    for prefix, module in _torch_layout(encoder).items():
        if isinstance(module, FrozenBatchNorm):
            c = module.scale.shape
            w, b, mean, var = (take(f"{prefix}.{k}", c) for k in ("weight", "bias", "running_mean", "running_var"))
            if all(v is not None for v in (w, b, mean, var)):
                if (var < 0).any():
                    problems.append(f"{prefix}.running_var: expected values >= 0, got min {var.min():g}")
                    continue
                scale = w / np.sqrt(var + BN_EPS)
                arrays[(module, "scale")] = scale.astype(np.float32)
                arrays[(module, "bias")] = (b - mean * scale).astype(np.float32)
        else:
            kh, kw, cin, cout = module.kernel.shape
            w = take(f"{prefix}.weight", (cout, cin, kh, kw))
            if w is not None:
                arrays[(module, "kernel")] = np.ascontiguousarray(w.transpose(2, 3, 1, 0)).astype(np.float32)
    extra = [k for k in state if k not in used and not any(p.search(k) for p in UNUSED)]  # checkpoint order
    problems += [f"{k}: not in the model (shape {tuple(np.shape(state[k]))})" for k in extra]
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... ({len(problems)} problems in all)" if len(problems) > 12 else "")
        raise WeightImportError(f"pretrained checkpoint {where} does not fit the ResNet encoder (blocks "
                                f"{encoder.blocks}; torchvision/timm resnet names expected):\n  {shown}")
    return arrays


def _find_encoder(model) -> tuple[ResNetEncoder, str]:
    if isinstance(model, ResNetEncoder):
        return model, ""
    if isinstance(model, ResNet):
        return model.encoder, "encoder"
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, ResNet):
        return backbone.encoder, "backbone/encoder"
    raise TypeError(f"model: expected a model with a ResNet backbone (config.model.backbone 'resnet50' or "
                    f"'resnet101'), a ResNet or a ResNetEncoder, got {type(model).__name__}"
                    + (f" with a {type(backbone).__name__} backbone" if backbone is not None else ""))


def _paths(node) -> dict:
    """{id(variable): "a/b/c"} of every parameter and frozen BatchNorm array under ``node``."""
    return {id(v): "/".join(str(p) for p in path) for path, v in nnx.iter_graph(node)
            if isinstance(v, (nnx.Param, FrozenAffine))}


def load_torch_weights(model, source) -> ImportReport:
    """Load a torchvision / timm ResNet checkpoint into ``model``'s ResNet encoder, in place.

    Args:
      model: an rwseg model whose ``backbone`` is a :class:`ResNet`, a :class:`ResNet`, or a
        :class:`ResNetEncoder`.
      source: a ``.pth`` / ``.safetensors`` file or a state dict (see :func:`read_state_dict`).

    Returns:
      An :class:`ImportReport` (loaded, freshly initialised and unused arrays).

    Raises:
      WeightImportError: the checkpoint does not fit (every offending key named).
      TypeError: ``model`` has no ResNet backbone.
    """
    encoder, _ = _find_encoder(model)
    state, where = read_state_dict(source)
    arrays = encoder_arrays(encoder, state, where=where)
    names = _paths(model)
    loaded = []
    for (module, attr), value in arrays.items():
        variable = getattr(module, attr)
        variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))
        loaded.append(names[id(variable)])
    done = set(loaded)
    fresh = sorted(p for p in names.values() if p not in done)
    unused = tuple(sorted(k for k in state if any(p.search(k) for p in UNUSED)))
    return ImportReport(where, tuple(sorted(loaded)), tuple(fresh), unused)
