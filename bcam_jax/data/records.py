"""Random-access record sources: one split as ``len(source)`` and ``source[i] -> (image,
label)``, with the image a uint8 (S, S, C) array and the label an int.

A TFDS split (`bcam_jax.data.tfds_source.TfdsRecords`) and an in-memory `Split`
(`SplitRecords`) both serve this interface, so that code reading a split record by record (a
streaming loader, the statistics below) does not depend on where the split lives.
`materialize` reads every record into one in-memory `Split` (the in-memory path);
`channel_stats` takes the per-channel mean and std in one chunked pass, without holding more
than one chunk of images.
"""

import concurrent.futures
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from bcam_jax.data.dataset import DataError, Split

CHUNK = 1024  # Records read per chunk.


class RecordSource(Protocol):
  """One split, record by record: `source[i]` is (uint8 (S, S, C) image, int label)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


class SplitRecords:
  """An in-memory `Split` as a record source."""

  def __init__(self, split: Split):
    self.split = split

  def __len__(self) -> int:
    return len(self.split)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.split.images[index], int(self.split.labels[index])


def _read(source: RecordSource, indices: Sequence[int], pool) -> list[tuple[np.ndarray, int]]:
  return list(pool.map(source.__getitem__, indices)) if pool else [source[i] for i in indices]


def _workers(workers: int | None) -> int:
  return min(16, os.cpu_count() or 1) if workers is None else workers


def materialize(source: RecordSource, where: str, workers: int | None = None) -> Split:
  """Every record of `source`, in order, as one in-memory `Split`.

  Records are read in a thread pool of `workers` (default: one per CPU, at most 16; image
  decoding releases the GIL), which does not change the result. A DataError naming `where`
  and the record when the records differ in shape or are not uint8.
  """
  n = len(source)
  if n == 0:
    raise DataError(f'{where}: no records.')
  workers = _workers(workers)
  with concurrent.futures.ThreadPoolExecutor(workers) if workers > 1 else _no_pool() as pool:
    first, _ = source[0]
    images = np.empty((n,) + first.shape, np.uint8)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, CHUNK):
      indices = range(start, min(n, start + CHUNK))
      for i, (image, label) in zip(indices, _read(source, indices, pool)):
        if image.shape != first.shape or image.dtype != np.uint8:
          raise DataError(
            f'{where}: record {i} is a {image.dtype} {image.shape} image; expected uint8 '
            f'{first.shape} like record 0.'
          )
        images[i], labels[i] = image, label
  return Split(images, labels)


class _no_pool:
  """A context manager standing for a thread pool when reading on the calling thread."""

  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


def channel_stats(
  source: RecordSource, chunk: int = CHUNK, workers: int | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and population std of every pixel of `source`, in [0, 1] units.

  One pass over the records, `chunk` at a time: counts each of the 256 pixel values per
  channel exactly, then takes both moments in float64 about the mean, so the result depends
  neither on the order of the records nor on `chunk`, and memory stays at one chunk.
  """
  n = len(source)
  if n == 0:
    raise DataError('Cannot compute the mean and std of an empty split.')
  counts = None
  workers = _workers(workers)
  with concurrent.futures.ThreadPoolExecutor(workers) if workers > 1 else _no_pool() as pool:
    for start in range(0, n, chunk):
      images = np.stack(
        [image for image, _ in _read(source, range(start, min(n, start + chunk)), pool)]
      )
      if counts is None:
        counts = np.zeros((images.shape[-1], 256), np.int64)
      for c in range(images.shape[-1]):
        counts[c] += np.bincount(images[..., c].ravel(), minlength=256)
  values = np.arange(256, dtype=np.float64) / 255
  means, stds = [], []
  for c in range(counts.shape[0]):
    total = counts[c].sum()
    mean = float((counts[c] * values).sum() / total)
    means.append(mean)
    stds.append(float(np.sqrt((counts[c] * (values - mean) ** 2).sum() / total)))
  return tuple(means), tuple(stds)
