"""Loading ml_collections config files: shipped ones by name, any other by path.

A config is a Python file defining ``get_config(arg=None)``. The method configs ship in
:mod:`rwseg.configs` and are named (``spn``, ``spn:smoke``); experiment configs anywhere
else are given by path (``experiments/configs/stanford_baseline.py``) and import the
shared fields with ``from rwseg.configs import common``.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from rwseg import configs

__all__ = ["resolve", "load_config_file", "parse_method_variant"]


def resolve(spec: str) -> str:
    """The file (and ``:arg``) a ``--config`` value means.

    ``spec`` is ``NAME[:arg]`` for a shipped config (:data:`rwseg.configs.NAMES`) or
    ``PATH[:arg]`` for a file. An existing file wins over a name; a path
    ``.../rwseg/configs/NAME.py`` that does not exist here (run outside a checkout) means the
    shipped ``NAME``.

    Args:
      spec: the ``--config`` value.

    Returns:
      ``"/abs/path/NAME.py[:arg]"``.

    Raises:
      FileNotFoundError: neither a file nor a shipped config name (the message lists the names).
    """
    spec = str(spec)
    where, sep, arg = spec.partition(":")
    candidate = pathlib.Path(where)
    if candidate.is_file():
        found = candidate.resolve()
    elif where in configs.NAMES:
        found = configs.path(where)
    elif candidate.parent.parts[-2:] == ("rwseg", "configs") and candidate.stem in configs.NAMES:
        found = configs.path(candidate.stem)
    else:
        raise FileNotFoundError(f"config: {where!r} is neither a config file nor a shipped config name "
                                f"(expected a path to a .py file or one of {', '.join(configs.NAMES)})")
    return f"{found}{sep}{arg}"


def load_config_file(spec: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a config given by name or path (``NAME:arg`` / ``PATH:arg`` accepted).

    Shipped configs are imported as the modules ``rwseg.configs.<name>``; other files are
    executed as a fresh module each time (nothing is added to ``sys.modules``).

    Args:
      spec: ``NAME[:arg]`` or ``PATH[:arg]`` (:func:`resolve`).
      arg: the ``get_config`` argument when ``spec`` has no ``:arg`` (e.g. ``"smoke"``).

    Returns:
      The ``ml_collections.ConfigDict``.
    """
    path, _, suffix = resolve(spec).partition(":")
    arg = suffix or arg
    path = pathlib.Path(path)
    if path.parent == configs.DIRECTORY and path.stem in configs.NAMES:
        return configs.get_config(path.stem, arg)
    spec_ = importlib.util.spec_from_file_location(f"rwseg_config_file_{path.stem}", path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def parse_method_variant(arg: str | None, methods, variants, *, default: str = ""):
    """The ``NAME[,smoke]`` argument of an experiment config that offers named variants.

    Args:
      arg: the config argument (``None`` or empty means ``default``).
      methods: the method names the config accepts.
      variants: ``{variant name: (method, {flattened key: value})}``, e.g.
        ``{"spn_half": ("spn", {"spn.guidance_input": "image"})}``.
      default: the name an empty ``arg`` means.

    Returns:
      ``(method, overrides, smoke)``: the method, the variant's overrides (``{}`` for a plain
      method; apply them last, with ``update_from_flattened_dict``) and whether ``,smoke``
      was given.

    Raises:
      ValueError: an unknown name or suffix (the message lists the methods and variants).
    """
    name, *rest = (arg or default).split(",")
    if (name not in methods and name not in variants) or rest not in ([], ["smoke"]):
        raise ValueError(f"config argument: expected NAME or NAME,smoke with NAME one of {tuple(methods)} "
                         f"or a variant {tuple(variants)}, got {arg!r}")
    method, overrides = variants.get(name, (name, {}))
    return method, dict(overrides), rest == ["smoke"]
