"""Constants shared by the data layer."""

IGNORE_INDEX = 255
"""Label value of pixels that count in no loss and no metric (unknown, borders, padding)."""

# ImageNet statistics in 0..255 units: the default normalisation.
DEFAULT_MEAN = (123.675, 116.28, 103.53)
DEFAULT_STD = (58.395, 57.12, 57.375)
