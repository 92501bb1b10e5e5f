"""The method configs shipped with rwseg (ml_collections), one module per method.

``rwseg.configs.<name>.get_config(arg=None)`` returns the ConfigDict of method ``name``
(:data:`NAMES`); ``arg="smoke"`` shrinks it to a few-second run. :mod:`rwseg.configs.common`
holds the shared fields; an experiment's own config file elsewhere imports it
(``from rwseg.configs import common``) and is loaded by path.

On the command line ``--config`` takes a name (``--config spn``, ``--config spn:smoke``)
or a path (``--config rwseg/configs/spn.py:smoke``, ``--config my_configs/x.py``); see
:func:`rwseg.train.config_files.resolve`.
"""

from __future__ import annotations

import importlib
import pathlib

import ml_collections

__all__ = ["NAMES", "DIRECTORY", "get_config", "path"]

NAMES = ("baseline", "spn", "rwn", "gcrf", "dilated", "rawks")
DIRECTORY = pathlib.Path(__file__).resolve().parent


def _check(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"config name: expected one of {', '.join(NAMES)}, got {name!r}")
    return name


def path(name: str) -> pathlib.Path:
    """The file of the shipped config ``name`` (e.g. ``.../rwseg/configs/spn.py``)."""
    return DIRECTORY / f"{_check(name)}.py"


def get_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the shipped config ``name`` (``arg``: ``None`` or ``"smoke"``)."""
    module = importlib.import_module(f"rwseg.configs.{_check(name)}")
    return module.get_config(arg)
