"""Constants shared by the data layer."""

from rwseg.constants import IGNORE_INDEX  # noqa: F401  (the single definition, re-exported)

# ImageNet statistics in 0..255 units: the default normalisation.
DEFAULT_MEAN = (123.675, 116.28, 103.53)
DEFAULT_STD = (58.395, 57.12, 57.375)
