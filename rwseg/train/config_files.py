"""Helpers for ml_collections config files (experiments/configs/*.py).

Config files are loaded by path (``--config experiments/configs/spn.py``), not as a
package, so they import their shared module with :func:`sibling`.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import ml_collections

__all__ = ["sibling", "load_config_file"]


def sibling(file: str, name: str) -> types.ModuleType:
    """Import ``<dir of file>/<name>.py`` as a module (cached under a path-unique name)."""
    path = pathlib.Path(file).resolve().with_name(f"{name}.py")
    key = f"_rwseg_config_{abs(hash(str(path)))}_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or not path.exists():
        raise FileNotFoundError(f"config helper module not found: {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a config file given by path (``path:arg`` also accepted)."""
    if arg is None and ":" in str(path):
        path, arg = str(path).split(":", 1)
    module = sibling(str(pathlib.Path(path).resolve().parent / "x.py"), pathlib.Path(path).stem)
    return module.get_config(arg) if arg is not None else module.get_config()
