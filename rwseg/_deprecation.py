"""One shared shim for renamed keywords and formerly positional options (issue 10).

:func:`deprecated_arguments` wraps a public function whose signature follows the operator
convention (docs/convention.md) so that calls written against its previous signature keep
working for one release, with a :class:`DeprecationWarning` naming the old and the new
spelling:

- ``renamed={"steps": "num_steps"}``: the old keyword ``steps=`` is forwarded as
  ``num_steps=``; passing both is a ``TypeError``.
- ``positional=("margin", "ignore_index")``: the options that used to follow the
  positional parameters of the new signature, in their old order (old names). Extra
  positional arguments are forwarded as these keywords (renamed if they are in
  ``renamed``); an extra positional argument that is also passed by keyword is a
  ``TypeError``, as are more extra positional arguments than listed.

The wrapper keeps the wrapped function's signature (``inspect.signature`` follows
``__wrapped__``) and docstring, so the documentation shows only the new spelling.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Callable, Mapping, Sequence

__all__ = ["deprecated_arguments"]


def _n_positional(fn) -> int:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        raise TypeError(f"{fn.__qualname__}: deprecated_arguments does not support *args")
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def deprecated_arguments(*, renamed: Mapping[str, str] | None = None,
                         positional: Sequence[str] = ()) -> Callable:
    """Decorator accepting the old spellings of a function's arguments, with a warning.

    Args:
        renamed: ``{old keyword: new keyword}``.
        positional: old names, in order, of the options that used to be accepted
            positionally right after the parameters that are still positional.

    Returns:
        A decorator; the decorated function has the wrapped function's signature.
    """
    renamed = dict(renamed or {})
    positional = tuple(positional)

    def decorate(fn):
        n_pos = _n_positional(fn)
        name = f"{fn.__module__.removeprefix('rwseg.')}.{fn.__name__}"
        kw_names = set(inspect.signature(fn).parameters)
        for old, new in renamed.items():
            if new not in kw_names:
                raise TypeError(f"{name}: renamed target {new!r} (from {old!r}) is not a parameter")
        for old in positional:
            if renamed.get(old, old) not in kw_names:
                raise TypeError(f"{name}: formerly positional {old!r} is not a parameter")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if len(args) > n_pos:
                extra = args[n_pos:]
                if len(extra) > len(positional):
                    raise TypeError(f"{name}() takes {n_pos + len(positional)} positional arguments at most "
                                    f"(deprecated spelling included) but {len(args)} were given")
                args = args[:n_pos]
                for old, value in zip(positional, extra):
                    new = renamed.get(old, old)
                    if new in kwargs or old in kwargs:
                        raise TypeError(f"{name}() got multiple values for argument {new!r} "
                                        f"(positionally as {old!r} and by keyword)")
                    spelled = f"{old!r} (now {new!r})" if new != old else repr(new)
                    warnings.warn(f"{name}: passing {spelled} positionally is deprecated; "
                                  f"pass it by keyword: {new}=...", DeprecationWarning, stacklevel=2)
                    kwargs[new] = value
            for old, new in renamed.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{name}() got both {old!r} (deprecated) and {new!r}; "
                                        f"pass only {new}=...")
                    warnings.warn(f"{name}: keyword {old!r} is deprecated; use {new!r} ({new}=...)",
                                  DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        wrapper.__deprecated_arguments__ = {"renamed": dict(renamed), "positional": positional}
        return wrapper

    return decorate
