"""Batches for training and evaluation: :func:`batch_dataset` and :func:`make_batches`.

Determinism: batch ``s`` is a pure function of ``(source, seed, s, shard_index,
shard_count, options)``. It is built from a grain ``MapDataset`` with random access, so
a run resumed at ``start_step`` sees exactly the batches an uninterrupted run would,
whatever was read before.

Training (``train=True``)
  A global stream of examples: the source shuffled per epoch (grain ``shuffle`` then
  ``repeat``; every epoch a new permutation) and augmented per stream position
  (``random_map``: random scale in ``scale_range``, pad with ignore + random crop to
  ``crop_size``, random left-right flip, optional colour jitter after the scaling; the RNG
  depends on the seed and the position only). Global batch ``s`` is stream positions
  ``[s*G, (s+1)*G)`` with ``G = batch_size * shard_count``; process ``p`` takes the ``p``-th block of
  ``batch_size`` of them. So processes read disjoint examples, and the union of the
  per-process batches is the same for any ``shard_count`` with the same ``G``.
  The stream is infinite (``num_steps=None`` iterates forever).

Evaluation (``train=False``)
  No augmentation, no shuffling. Process ``p`` reads source indices ``p, p+P, p+2P, ...``
  (``P = shard_count``) in order; each image is padded bottom/right (never cropped) to
  ``pad_size`` with label 255, so every batch has one shape. Every process yields the
  same number of batches, ``ceil(ceil(N / P) / batch_size)``; slots past its last example
  are *ignore-only examples* (image 0, label 255 everywhere, ``mask`` False, ``valid``
  False, ``index`` -1). Metrics that skip label 255 are therefore exact: every example
  counts exactly once over all processes. ``num_steps=None`` = one pass.

**Batch**: a dict of numpy arrays:

- ``"image"``: float32 ``(B, h, w, 3)``, normalised ``(x - mean) / std``;
- ``"label"``: int32 ``(B, h, w)`` (255 = ignore);
- ``"mask"``: bool ``(B, h, w)``, True where the pixel comes from the image (False on padding);
- ``"valid"``: bool ``(B,)``, False on ignore-only examples;
- ``"index"``: int64 ``(B,)``, the source index (-1 on ignore-only examples);
- with ``scribbles=True``, ``"scribbles"``: int32 ``(B, h, w)`` (-1 unlabelled, 0..L-1 labelled).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Iterator, Optional

import grain
import numpy as np

from rwseg import _validate as V
from rwseg.data import augment
from rwseg.data.constants import DEFAULT_MEAN, DEFAULT_STD, IGNORE_INDEX


def _derived_seeds(seed: int, n: int) -> list[int]:
    """``n`` independent 32-bit seeds derived from ``seed`` (shuffle, augmentation, ...)."""
    return [int(s) for s in np.random.SeedSequence(int(seed)).generate_state(n)]


def _scribbles(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Synthetic scribbles for one label map (:func:`rwseg.data.scribbles.scribbles_from_labels`)."""
    import jax

    from rwseg.data.scribbles import scribbles_from_labels  # lazily: keeps ``rwseg.data`` light

    key = jax.random.key(int(rng.integers(0, 2**31 - 1)))
    return np.asarray(scribbles_from_labels(label, key), dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class _Transform:
    """Per-example transform; a picklable callable for ``grain`` ``random_map``."""

    train: bool
    crop_size: Optional[tuple[int, int]]
    pad_size: Optional[tuple[int, int]]
    scale_range: Optional[tuple[float, float]]
    flip: bool
    color_jitter: tuple[float, float, float]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scribbles: bool

    def __call__(self, item: tuple[int, dict], rng: np.random.Generator) -> dict:
        index, ex = item
        image = np.asarray(ex["image"], dtype=np.uint8)
        label = np.asarray(ex["label"], dtype=np.int32)
        if self.train:
            if self.scale_range is not None and tuple(self.scale_range) != (1.0, 1.0):
                image, label = augment.random_scale(image, label, rng, self.scale_range)
            if any(self.color_jitter):
                image = augment.color_jitter(image, rng, self.color_jitter)
            x = augment.normalize(image, self.mean, self.std)
            mask = np.ones(label.shape, dtype=bool)
            if self.crop_size is not None:
                x, label, mask = augment.random_crop(x, label, mask, self.crop_size, rng)
            if self.flip:
                x, label, mask = augment.random_flip(x, label, mask, rng)
        else:
            h, w = image.shape[:2]
            if h > self.pad_size[0] or w > self.pad_size[1]:
                raise ValueError(
                    f"pad_size: example {index} has (H, W) = {(h, w)}, larger than pad_size = {tuple(self.pad_size)}; "
                    "evaluation pads and never crops: pass a larger pad_size (or None for the source maximum)"
                )
            x = augment.normalize(image, self.mean, self.std)
            x, label, mask = augment.pad_to(x, label, np.ones(label.shape, dtype=bool), self.pad_size)
        out = {
            "image": np.ascontiguousarray(x, dtype=np.float32),
            "label": np.ascontiguousarray(label, dtype=np.int32),
            "mask": np.ascontiguousarray(mask),
            "valid": np.bool_(True),
            "index": np.int64(index),
        }
        if self.scribbles:
            out["scribbles"] = _scribbles(out["label"], rng)
        return out


@dataclasses.dataclass(frozen=True)
class _Read:
    """``i -> (i, source[i])``; picklable."""

    source: object

    def __call__(self, index: int):
        return index, self.source[index]


def _ignore_example(like: dict) -> dict:
    """An ignore-only example shaped like ``like`` (eval padding)."""
    out = {
        "image": np.zeros_like(like["image"]),
        "label": np.full_like(like["label"], IGNORE_INDEX),
        "mask": np.zeros_like(like["mask"]),
        "valid": np.bool_(False),
        "index": np.int64(-1),
    }
    if "scribbles" in like:
        out["scribbles"] = np.full_like(like["scribbles"], -1)
    return out


def _collate(examples: list[dict]) -> dict:
    shapes = {ex["image"].shape for ex in examples}
    if len(shapes) != 1:
        raise ValueError(
            f"crop_size: examples of one batch have different shapes {sorted(shapes)}; "
            "pass crop_size=(h, w) for sources with variable image sizes"
        )
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


@dataclasses.dataclass(frozen=True)
class _TrainBatch:
    examples: grain.MapDataset
    batch_size: int
    shard_index: int
    shard_count: int

    def __call__(self, step: int) -> dict:
        first = (step * self.shard_count + self.shard_index) * self.batch_size
        return _collate([self.examples[first + j] for j in range(self.batch_size)])


@dataclasses.dataclass(frozen=True)
class _EvalBatch:
    examples: grain.MapDataset
    num_examples: int
    batch_size: int
    shard_index: int
    shard_count: int

    def __call__(self, step: int) -> dict:
        idx = [self.shard_index + (step * self.batch_size + j) * self.shard_count for j in range(self.batch_size)]
        real = [self.examples[i] for i in idx if i < self.num_examples]
        like = real[0] if real else self.examples[0]
        return _collate(real + [_ignore_example(like)] * (self.batch_size - len(real)))


def max_image_size(source) -> tuple[int, int]:
    """The largest height and width over a source (reads every example once).

    Args:
        source: random-access source of ``{"label": (H, W), ...}`` examples.

    Returns:
        ``(max H, max W)``.
    """
    h = w = 0
    for i in range(len(source)):
        sh = np.shape(source[i]["label"])
        h, w = max(h, sh[0]), max(w, sh[1])
    return h, w


def _pair(name, value):
    if value is None:
        return None
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in value):
        raise ValueError(f"{name}: expected (h, w) of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def _shards(shard_index, shard_count):
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index: expected 0 <= shard_index < shard_count = {shard_count}, got {shard_index}")
    return int(shard_index), int(shard_count)


def batch_dataset(
    source,
    *,
    batch_size: int,
    crop_size=None,
    train: bool,
    seed: int,
    scribbles: bool = False,
    shard_index: Optional[int] = None,
    shard_count: Optional[int] = None,
    scale_range=(0.75, 1.25),
    flip: bool = True,
    color_jitter=(0.0, 0.0, 0.0),
    mean=DEFAULT_MEAN,
    std=DEFAULT_STD,
    pad_size=None,
) -> grain.MapDataset:
    """A grain ``MapDataset`` whose element ``s`` is batch ``s`` (see the module docstring).

    :func:`make_batches` iterates over this dataset.

    Args:
        source: random-access source of ``{"image": uint8 (H, W, 3), "label": int (H, W)}``.
        batch_size: per-process batch ``B``.
        crop_size: training crop ``(h, w)`` (or int); ``None`` keeps each (scaled) image's
            size, which needs equal sizes within a batch. Ignored in evaluation.
        train: augmentation + per-epoch shuffling (True) or padded, ordered evaluation (False).
        seed: seed of shuffling, augmentation and scribbles.
        scribbles: add ``"scribbles"`` from :func:`rwseg.data.scribbles_from_labels`.
        shard_index: this process's shard (default ``jax.process_index()``).
        shard_count: the number of shards (default ``jax.process_count()``).
        scale_range: random scale factors for training; ``None`` or ``(1, 1)`` disables.
        flip: random left-right flips in training.
        color_jitter: ``(brightness, contrast, saturation)`` strengths of the training colour
            jitter (:func:`rwseg.data.augment.color_jitter`, after scaling); ``(0, 0, 0)`` disables.
        mean: per-channel mean subtracted, in 0..255 units (default ImageNet statistics).
        std: per-channel divisor, in 0..255 units (default ImageNet statistics).
        pad_size: evaluation size ``(h, w)``; ``None`` = the maximum over the source (reads
            every example once). An image larger than ``pad_size`` raises ``ValueError``.

    Returns:
        A ``grain.MapDataset`` of batch dicts: of length ``sys.maxsize`` in training
        (infinite), ``ceil(ceil(N / shard_count) / batch_size)`` in evaluation.

    Raises:
        ValueError: an empty source, a bad shard, size or ``scale_range``.
    """
    batch_size = V.check_nonnegative_int("batch_size", batch_size, positive=True)
    seed = V.check_nonnegative_int("seed", seed)
    n = len(source)
    if n == 0:
        raise ValueError("source: expected a non-empty source, got 0 examples")
    shard_index, shard_count = _shards(shard_index, shard_count)
    crop_size = _pair("crop_size", crop_size)
    pad_size = _pair("pad_size", pad_size)
    if scale_range is not None:
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range: expected (lo, hi) with 0 < lo <= hi, got {tuple(scale_range)}")
        scale_range = (float(lo), float(hi))
    jitter = tuple(color_jitter) if isinstance(color_jitter, (tuple, list)) else ()
    if len(jitter) != 3 or not all(isinstance(v, (int, float)) and 0 <= v < 1 for v in jitter):
        raise ValueError(f"color_jitter: expected (brightness, contrast, saturation), each in [0, 1), "
                         f"got {color_jitter!r}")
    if not train and pad_size is None:
        pad_size = max_image_size(source)
    transform = _Transform(
        train=bool(train),
        crop_size=crop_size,
        pad_size=pad_size,
        scale_range=scale_range,
        flip=bool(flip),
        color_jitter=tuple(float(v) for v in jitter),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        scribbles=bool(scribbles),
    )
    shuffle_seed, augment_seed = _derived_seeds(seed, 2)
    indexed = grain.MapDataset.range(n).map(_Read(source))
    if train:
        examples = indexed.shuffle(seed=shuffle_seed).repeat().random_map(transform, seed=augment_seed)
        length = None
        fn = _TrainBatch(examples, batch_size, shard_index, shard_count)
    else:
        examples = indexed.random_map(transform, seed=augment_seed)
        length = math.ceil(math.ceil(n / shard_count) / batch_size)
        fn = _EvalBatch(examples, n, batch_size, shard_index, shard_count)
    steps = grain.MapDataset.range(sys.maxsize if length is None else length)
    return steps.map(fn)


def make_batches(
    source,
    *,
    start_step: int = 0,
    num_steps: Optional[int] = None,
    num_threads: int = 2,
    prefetch: int = 4,
    **options,
) -> Iterator[dict]:
    """Iterate over numpy batches ``start_step, start_step + 1, ...`` (module docstring):
    the elements of :func:`batch_dataset` from ``start_step`` on.

    Args:
      source: random-access source (``len``, ``__getitem__``) of ``{"image": uint8 (H, W, 3),
        "label": int (H, W)}``, e.g. from :func:`rwseg.data.load_source`.
      start_step: first batch number to produce (resume).
      num_steps: number of batches (``None``: infinite in training, one pass in evaluation).
      num_threads: grain read threads (does not affect the results).
      prefetch: grain prefetch buffer, in batches (does not affect the results).
      **options: the keyword arguments of :func:`batch_dataset` (``batch_size``,
        ``crop_size``, ``train``, ``seed``, ``scribbles``, the shards, the augmentation,
        ``mean`` / ``std``, ``pad_size``), with its defaults.

    Returns:
      An iterator of batch dicts of numpy arrays (keys and shapes in the module docstring).
    """
    ds = batch_dataset(source, **options)
    start_step = V.check_nonnegative_int("start_step", start_step)
    if num_steps is not None:
        num_steps = V.check_nonnegative_int("num_steps", num_steps)
    stop = None if num_steps is None else start_step + int(num_steps)
    if stop is not None:
        stop = min(stop, len(ds))
    ds = ds[start_step:stop]
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))
