"""Splits too large for memory, read on demand: random access by index, decoded in threads.

A split is streamed from a *record source*: any object with ``__len__()`` and
``__getitem__(i) -> (uint8 image (S, S, C), int label)``, plus a ``labels`` int array (N,)
when the labels are known without decoding (an image folder knows them from its scan;
otherwise one pass over the source reads them). `FolderSource` is the source of an image
folder split: files from `folder.scan_image_folder`, each decoded, converted and resized /
centre-cropped by `folder.decode_image` when asked for.

`StreamedSplit` stands where a `Split` does. Its ``images`` is a `LazyImages`: indexing it with
an int, a slice, an index array or a boolean mask, as the training loop, `eval_batches`,
evaluation and the prototypes index an in-memory array, decodes just those images, in a
pool of worker threads, into one uint8 array. So every consumer of a `Split` works on a
streamed split unchanged, and streamed batches are bitwise the in-memory ones (the same
decoder makes both).

The order stays a pure function of ``(seed, step)``: the training loop takes the indices of
step ``s`` from `batching.train_batch_indices`, as for a split in memory, and
`train_batches` only fetches them ahead of time (``read_ahead`` batches, in a background
thread) while the accelerator runs the step before. A killed run therefore resumes to
bitwise the same parameters whatever the source.

Why threads and not grain: the order is already fixed by ``train_batch_indices``, so what
is left is fetching given indices in parallel; Pillow releases the GIL while it decodes and
resizes, so threads keep every core busy (see ``bench/throughput.py``) without the pickling,
process start-up and shared-memory copies of worker processes, and without a dependency
(grain's own ``MapDataset`` + ``ReadOptions(num_threads=...)`` is this same thread pool
around a random-access source). A source that holds the GIL while decoding would want
processes; the record-source interface is the one grain's ``RandomAccessDataSource`` has,
so such a source can be handed to grain as is.

`load_streamed_folder` is the streamed counterpart of `folder.read_image_folder`; the mean
and std of its train split come from one chunked pass (`records.channel_stats`, cached in
the workdir by `stats_cache`), and `streamed_class_sums` gives the prototypes'
per-class image sums in one chunked pass, so neither ever holds the split in memory.
"""

import collections
import concurrent.futures
import functools
import os
import threading

import numpy as np
from absl import logging

from bcam_jax.data.batching import train_batch_indices
from bcam_jax.data.dataset import DataError
from bcam_jax.data.folder import (
  _GREY_MODES,
  FolderDataset,
  _header,
  decode_image,
  folder_dataset,
  read_image_folder,
  scan_image_folder,
)
from bcam_jax.data.records import CHUNK, materialize

DEFAULT_READ_AHEAD = 2  # training batches fetched while the step before runs
STREAM_MODES = ('auto', 'stream', 'memory')


def default_workers() -> int:
  """Decoding threads when not configured: one per CPU, at most 16."""
  return min(16, os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
  """One shared decoding pool per worker count (its threads idle when nothing streams)."""
  return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='bcam-decode')


class FolderSource:
  """The images of one image-folder split as a record source, decoded on demand.

  `pairs` are the (path, label) of `FolderIndex.files[split]`; each item is decoded with
  `folder.decode_image(path, channels, image_size)`, so an item is bitwise the row
  `read_image_folder` would hold in memory.
  """

  def __init__(self, pairs, channels: int, image_size: int):
    self.paths = tuple(path for path, _ in pairs)
    self.labels = np.array([label for _, label in pairs], np.int32)
    self.channels, self.image_size = channels, image_size

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    return decode_image(self.paths[i], self.channels, self.image_size), int(self.labels[i])

  def __repr__(self) -> str:
    return f'FolderSource({len(self)} images, {self.channels} channels, {self.image_size} px)'


class _Subset:
  """The items `indices` of a record source, as a record source."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, np.int64)
    self.labels = _source_labels(source)[self.indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.source[int(self.indices[i])]


def _source_labels(source) -> np.ndarray:
  """The labels of a source: its `labels` array, else read item by item (one pass)."""
  labels = getattr(source, 'labels', None)
  if labels is None:
    labels = [source[i][1] for i in range(len(source))]
  labels = np.asarray(labels, np.int32)
  if labels.shape != (len(source),):
    raise DataError(
      f'{source!r}: labels have shape {labels.shape}, expected ({len(source)},), one per item.'
    )
  return labels


class LazyImages:
  """The images of a record source, indexed like a uint8 (N, S, S, C) numpy array.

  An int gives one image; a slice, an integer array or a boolean mask gives the images in
  that order as a new array, decoded by `workers` threads. Nothing is kept: indexing twice
  decodes twice.
  """

  dtype = np.dtype(np.uint8)
  ndim = 4

  def __init__(self, source, image_shape: tuple[int, int, int], workers: int):
    self.source, self.image_shape, self.workers = source, tuple(image_shape), workers

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self.source),) + self.image_shape

  def __len__(self) -> int:
    return len(self.source)

  def _image(self, i: int) -> np.ndarray:
    image = np.asarray(self.source[int(i)][0])
    if image.shape != self.image_shape or image.dtype != np.uint8:
      raise DataError(
        f'{self.source!r} item {int(i)}: image is {image.dtype} {image.shape}, expected '
        f'uint8 {self.image_shape}.'
      )
    return image

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
      return self._image(np.arange(len(self))[key])
    indices = np.arange(len(self))[key]
    if indices.ndim != 1:
      raise IndexError(f'LazyImages takes an int, a slice or a 1-D index; got {key!r}.')
    out = np.empty((len(indices),) + self.image_shape, np.uint8)
    if len(indices) <= 1 or self.workers == 1:
      for row, i in enumerate(indices):
        out[row] = self._image(i)
      return out
    # Chunks of rows per task: one task per worker and then some, to balance uneven files.
    chunks = np.array_split(np.arange(len(indices)), min(len(indices), 4 * self.workers))

    def fill(rows):
      for row in rows:
        out[row] = self._image(indices[row])

    list(_pool(self.workers).map(fill, chunks))  # list(): re-raises a worker's error here
    return out

  def __array__(self, dtype=None, copy=None):
    """The whole split in memory (what `np.asarray` on a streamed split costs)."""
    array = self[:]
    return array if dtype is None else array.astype(dtype)


class StreamedSplit:
  """A split read on demand from a record source; stands where a `Split` does.

  `images` is a `LazyImages`, `labels` the int32 labels (N,) in memory.
  """

  streamed = True

  def __init__(self, source, image_shape: tuple[int, int, int], workers: int | None = None):
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
      raise DataError(f'workers must be a positive integer; got {workers!r}.')
    self.source = source
    self.labels = _source_labels(source)
    self.images = LazyImages(source, image_shape, workers)

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices) -> 'StreamedSplit':
    """The examples `indices` (in that order), still streamed."""
    return StreamedSplit(
      _Subset(self.source, indices), self.images.image_shape, self.images.workers
    )

  def __repr__(self) -> str:
    return f'StreamedSplit({self.source!r}, {len(self)} examples)'


def is_streamed(split) -> bool:
  """Whether `split` is read on demand (a `StreamedSplit`) rather than held in memory."""
  return getattr(split, 'streamed', False)


def read_ahead(iterator, depth: int):
  """Yields the items of `iterator` while a background thread computes the next `depth`.

  The items and their order are those of `iterator`; an exception it raises is raised here,
  at the item where it happened. Closing the generator stops the thread after the item it
  is computing.
  """
  if depth < 1:
    yield from iterator
    return
  buffer = collections.deque()
  ready = threading.Condition()
  stop = threading.Event()
  done = object()

  def produce():
    try:
      for item in iterator:
        with ready:
          ready.wait_for(lambda: len(buffer) < depth or stop.is_set())
          if stop.is_set():
            return
          buffer.append((item, None))
          ready.notify_all()
    except BaseException as e:  # Handed to the consumer, raised where the item was due.
      with ready:
        buffer.append((None, e))
        ready.notify_all()
      return
    with ready:
      buffer.append((done, None))
      ready.notify_all()

  thread = threading.Thread(target=produce, name='bcam-read-ahead', daemon=True)
  thread.start()
  try:
    while True:
      with ready:
        ready.wait_for(lambda: buffer)
        item, error = buffer.popleft()
        ready.notify_all()
      if error is not None:
        raise error
      if item is done:
        return
      yield item
  finally:
    with ready:
      stop.set()
      ready.notify_all()
    thread.join()


def train_batches(split, batch_size: int, seed: int, start: int, stop: int, rows=slice(None)):
  """(images, labels) of the training steps start..stop-1, rows `rows` of each global batch.

  Step ``s`` holds the examples ``train_batch_indices(len(split), batch_size, seed, s)[rows]``
  whatever the split; a streamed split is fetched `DEFAULT_READ_AHEAD` batches ahead, in the
  background, so decoding overlaps the step.
  """

  def batches():
    for step in range(start, stop):
      idx = train_batch_indices(len(split), batch_size, seed, step)[rows]
      yield split.images[idx], split.labels[idx]

  return prefetched(split, batches())


def prefetched(split, batches):
  """`batches` of `split` read `DEFAULT_READ_AHEAD` ahead when `split` is streamed, else as
  they are (e.g. `prefetched(split, eval_batches(split, n))` for an evaluation)."""
  return read_ahead(batches, DEFAULT_READ_AHEAD) if is_streamed(split) else batches


def decoded_megabytes(num_images: int, image_size: int, channels: int) -> float:
  """The memory (MiB) `num_images` uint8 images of image_size^2 x channels take."""
  return num_images * image_size * image_size * channels / 2**20


def should_stream(mode: str, megabytes: float, limit_mb: float) -> bool:
  """Whether to stream: `mode` 'stream' / 'memory' decide; 'auto' streams above `limit_mb`."""
  if mode not in STREAM_MODES:
    raise DataError(f'data.stream={mode!r} is not valid; choose one of {STREAM_MODES}.')
  if mode == 'auto':
    return megabytes > limit_mb
  return mode == 'stream'


def load_streamed_folder(
  root: str | os.PathLike, image_size: int, channels: int | None = None, workers: int | None = None
) -> FolderDataset:
  """An image folder whose splits are `StreamedSplit`s of `FolderSource`s.

  The same arrays as `folder.read_image_folder(root, image_size, channels)`, read when
  indexed. With `channels` None the channel count comes from the image headers (read once,
  without decoding); mean and std come from one chunked pass over the train split, on first use.
  """
  if channels not in (None, 1, 3):
    raise DataError(f'channels must be None (from the images), 1 or 3; got {channels!r}.')
  if not isinstance(image_size, int) or image_size < 1:
    raise DataError(
      f'image_size must be a positive integer to stream a folder; got {image_size!r}.'
    )
  workers = default_workers() if workers is None else workers
  index = scan_image_folder(root)
  if channels is None:
    paths = [path for pairs in index.files.values() for path, _ in pairs]
    modes = _pool(workers).map(lambda path: _header(path)[0], paths)
    channels = 1 if all(mode in _GREY_MODES for mode in modes) else 3
  shape = (image_size, image_size, channels)
  splits = {
    split: StreamedSplit(FolderSource(pairs, channels, image_size), shape, workers)
    for split, pairs in index.files.items()
  }
  return folder_dataset(index, channels, image_size, splits, f'streamed, {workers} threads')


def _stream_choice(spec, what: str, count: int, size: int, channels: int):
  """(whether to stream, decoding threads) for `count` images of size^2 x channels, as the
  `loading.DataSpec` `spec`'s ``data.stream``, ``data.in_memory_limit_mb`` and
  ``data.decode_workers`` say, logging which."""
  mode = spec.stream
  limit_mb = spec.in_memory_limit_mb
  workers = spec.decode_workers or default_workers()
  megabytes = decoded_megabytes(count, size, channels)
  stream = should_stream(mode, megabytes, limit_mb)
  logging.info(
    '%s: %d images, %.1f MiB decoded at %d px; data.stream=%r, data.in_memory_limit_mb=%s: %s.',
    what,
    count,
    megabytes,
    size,
    mode,
    limit_mb,
    f'streamed from disk, {workers} threads' if stream else 'read into memory',
  )
  return stream, workers


def read_folder_for(spec, root: str) -> FolderDataset:
  """The image folder `root` in memory or streamed, as ``data.stream`` says, logging which.

  'auto' streams when every split decoded at ``data.image_size`` would take more than
  ``data.in_memory_limit_mb`` MiB (counting 3 channels when ``data.channels`` is 0, before
  the headers are read); ``data.decode_workers`` threads decode (0: `default_workers`).
  """
  channels = spec.channels or None
  index = scan_image_folder(root)
  count = sum(len(pairs) for pairs in index.files.values())
  stream, workers = _stream_choice(
    spec, f'Image folder {root}', count, spec.image_size, channels or 3
  )
  if stream:
    return load_streamed_folder(root, spec.image_size, channels, workers)
  return read_image_folder(root, spec.image_size, channels, workers)


def record_splits_for(spec, sources: dict, image_shape: tuple, what: str) -> dict:
  """Record sources by split role (e.g. a TFDS dataset's `TfdsRecords`) in memory
  (`records.materialize`) or as `StreamedSplit`s, as ``data.stream`` and
  ``data.in_memory_limit_mb`` say for their decoded size, logging which."""
  count = sum(len(source) for source in sources.values())
  stream, workers = _stream_choice(spec, what, count, image_shape[0], image_shape[2])
  if stream:
    return {role: StreamedSplit(source, image_shape, workers) for role, source in sources.items()}
  return {
    role: materialize(source, getattr(source, 'where', role), workers)
    for role, source in sources.items()
  }


def streamed_class_sums(split, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(per-class sum of the images' uint8 pixels, int64 (num_classes, S, S, C); per-class
  count), from one pass over `split` in chunks of `CHUNK` images. Integer sums are exact
  whatever the chunking, so means from them are the same as from the split in memory.
  """
  labels = np.asarray(split.labels)
  sums = np.zeros((num_classes,) + tuple(split.images.shape[1:]), np.int64)
  for start in range(0, len(split), CHUNK):
    chunk, chunk_labels = split.images[start : start + CHUNK], labels[start:][:CHUNK]
    for c in np.unique(chunk_labels):
      if 0 <= c < num_classes:
        sums[c] += chunk[chunk_labels == c].sum(axis=0, dtype=np.int64)
  counts = np.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes)
  return sums, counts


__all__ = [
  'DEFAULT_READ_AHEAD',
  'STREAM_MODES',
  'FolderSource',
  'LazyImages',
  'StreamedSplit',
  'decoded_megabytes',
  'default_workers',
  'is_streamed',
  'load_streamed_folder',
  'prefetched',
  'read_ahead',
  'read_folder_for',
  'should_stream',
  'streamed_class_sums',
  'train_batches',
]
