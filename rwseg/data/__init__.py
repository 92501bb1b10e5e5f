"""rwseg.data: segmentation datasets and deterministic input pipelines.

Datasets are TFDS builders written as ``array_record`` (no TensorFlow), read with TFDS
data sources and batched with a grain ``MapDataset``:

* :func:`dataset_info` / :func:`load_source` — datasets by name: ``"synthetic"``
  (default, generated from a seed), ``"stanford_background"`` (local folder),
  ``"voc2012"`` (local VOCdevkit or download), ``"oxford_iiit_pet"`` (TFDS catalogue).
* :func:`make_batches` — augmented/padded, normalised numpy batches; batch ``s`` is a
  pure function of ``(seed, s)``; sharded per process.
* :func:`denormalize` — back to uint8 pictures.
* :func:`scribbles_from_labels` — synthetic scribbles from dense labels (RAWKS).

Labels are int32 ``(H, W)`` with :data:`IGNORE_INDEX` ``= 255`` for pixels that count
in no loss or metric.
"""

from rwseg.data.augment import denormalize, normalize
from rwseg.data.catalogue import NAMES, DatasetInfo, Source, dataset_info, load_source, splits_of
from rwseg.data.constants import DEFAULT_MEAN, DEFAULT_STD, IGNORE_INDEX
from rwseg.data.files import DataFileError
from rwseg.data.pipeline import batch_dataset, make_batches, max_image_size
from rwseg.data.scribbles import scribbles_from_labels
from rwseg.data.synthetic import synthetic_example

__all__ = [
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "IGNORE_INDEX",
    "NAMES",
    "DataFileError",
    "DatasetInfo",
    "Source",
    "batch_dataset",
    "dataset_info",
    "splits_of",
    "denormalize",
    "load_source",
    "make_batches",
    "max_image_size",
    "normalize",
    "scribbles_from_labels",
    "synthetic_example",
]
