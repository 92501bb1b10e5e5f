"""Constants shared by the whole library (operators, models, data, metrics)."""

__all__ = ["IGNORE_INDEX"]

IGNORE_INDEX = 255
"""Label value of pixels that count in no loss and no metric (unknown, borders, padding).

The single definition: every ``ignore_index`` keyword of the operators and metrics
defaults to it, and :mod:`rwseg.data.constants` re-exports it.
"""
