"""rwseg._deprecation: old keyword names and formerly positional options keep working, with a warning."""

import inspect
import warnings

import pytest

from rwseg._deprecation import deprecated_arguments


@deprecated_arguments(renamed={"steps": "num_steps", "alpha": "temperature"},
                      positional=("alpha", "ignore_index"))
def _f(x, y, *, temperature=1.0, ignore_index=255, num_steps=None):
    return (x, y, temperature, ignore_index, num_steps)


def test_new_spelling_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _f(1, 2, temperature=3, ignore_index=4, num_steps=5) == (1, 2, 3, 4, 5)
        assert _f(1, y=2) == (1, 2, 1.0, 255, None)


def test_renamed_keyword_warns_naming_both_spellings():
    with pytest.warns(DeprecationWarning, match=r"'steps' is deprecated; use 'num_steps'") as rec:
        assert _f(1, 2, steps=7) == (1, 2, 1.0, 255, 7)
    assert rec[0].filename == __file__  # points at the caller, not at the shim


def test_formerly_positional_options_warn_and_map_in_old_order():
    with pytest.warns(DeprecationWarning) as rec:
        assert _f(1, 2, 0.5, 9) == (1, 2, 0.5, 9, None)
    messages = [str(r.message) for r in rec]
    assert any("'alpha' (now 'temperature') positionally" in m and "temperature=" in m for m in messages)
    assert any("'ignore_index' positionally" in m for m in messages)
    with pytest.warns(DeprecationWarning):
        assert _f(1, 2, 0.5) == (1, 2, 0.5, 255, None)


def test_old_and_new_together_is_a_type_error():
    with pytest.raises(TypeError, match=r"both 'steps' \(deprecated\) and 'num_steps'"):
        _f(1, 2, steps=1, num_steps=2)
    with pytest.raises(TypeError, match=r"multiple values for argument 'temperature'"):
        _f(1, 2, 0.5, temperature=0.5)
    with pytest.raises(TypeError, match=r"multiple values for argument 'temperature'"):
        _f(1, 2, 0.5, alpha=0.5)


def test_too_many_positional_arguments_is_a_type_error():
    with pytest.raises(TypeError, match=r"takes 4 positional arguments at most"):
        _f(1, 2, 3, 4, 5)


def test_signature_and_docstring_are_the_new_ones():
    sig = inspect.signature(_f)
    assert list(sig.parameters) == ["x", "y", "temperature", "ignore_index", "num_steps"]
    assert sig.parameters["temperature"].kind is inspect.Parameter.KEYWORD_ONLY
    assert _f.__wrapped__.__name__ == "_f"


def test_misdeclared_shim_fails_at_decoration():
    with pytest.raises(TypeError, match="renamed target 'nope'"):
        deprecated_arguments(renamed={"old": "nope"})(lambda x, *, new=1: x)
    with pytest.raises(TypeError, match="formerly positional 'gone'"):
        deprecated_arguments(positional=("gone",))(lambda x, *, new=1: x)
