"""Data: MNIST / Fashion-MNIST loading, splits, batching, preprocessing and class prototypes.

The datasets are small (70,000 28x28 uint8 images), so they are held in memory as numpy
arrays and fed to the jitted step batch by batch. Two sources are supported:

* ``tfds``: ``tfds.data_source`` (random access over ArrayRecord, no TensorFlow needed once
  the dataset is prepared); preparing it needs network access and TensorFlow.
* ``idx``: a directory holding the four standard IDX files (optionally gzipped), parsed with
  numpy and validated (magic numbers, dimensions, counts, label range).

``auto`` tries a prepared TFDS copy, then IDX files, then a TFDS download, and reports every
attempt when all fail. Batch order is a pure function of ``(seed, step)`` so that a resumed
run sees exactly the batches it would have seen without interruption. Images stay uint8 at
28x28 on the host; scaling, resizing and normalisation happen on device in ``preprocess``.
Class prototypes (per-class mean images, min-max scaled) are computed once per workdir and
reused on resume.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import gzip
import math
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from bcam_jax import io_utils
from bcam_jax.report import figures

DATA_DIR_ENV = 'BCAM_DATA_DIR'
IMAGE_SIZE = 28  # Native resolution of both datasets.
IDX_FILES = {
  'train_images': 'train-images-idx3-ubyte',
  'train_labels': 'train-labels-idx1-ubyte',
  'test_images': 't10k-images-idx3-ubyte',
  'test_labels': 't10k-labels-idx1-ubyte',
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte data, 3 dimensions (n, rows, cols)
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte data, 1 dimension (n)
_MINMAX_EPS = 1e-8


class DataError(ValueError):
  """Data cannot be found, read or used as asked; the message says what and where."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset: classes and the literature normalisation constants."""

  name: str
  num_classes: int
  mean: float
  std: float
  class_names: tuple[str, ...]


DATASETS: dict[str, DatasetInfo] = {
  'mnist': DatasetInfo(
    name='mnist',
    num_classes=10,
    mean=0.1307,
    std=0.3081,
    class_names=tuple(str(d) for d in range(10)),
  ),
  'fashion_mnist': DatasetInfo(
    name='fashion_mnist',
    num_classes=10,
    mean=0.2860,
    std=0.3530,
    class_names=(
      'T-shirt/top',
      'Trouser',
      'Pullover',
      'Dress',
      'Coat',
      'Sandal',
      'Shirt',
      'Sneaker',
      'Bag',
      'Ankle boot',
    ),
  ),
}


def dataset_info(name: str) -> DatasetInfo:
  """Returns the `DatasetInfo` of `name`, or a DataError listing the valid names."""
  try:
    return DATASETS[name]
  except KeyError:
    raise DataError(
      f'Unknown dataset {name!r}; valid names: {", ".join(sorted(DATASETS))}.'
    ) from None


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in memory: images (N, 28, 28, 1) uint8 and labels (N,) int32."""

  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if self.images.shape[0] != self.labels.shape[0]:
      raise DataError(f'Split has {self.images.shape[0]} images but {self.labels.shape[0]} labels.')

  def __len__(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class Datasets:
  """The three splits of one dataset, and a human-readable note of where they came from."""

  info: DatasetInfo
  train: Split
  val: Split
  test: Split
  source: str


# ----------------------------------------------------------------------------------------
# IDX files


def _read_file_bytes(path: str) -> bytes:
  """Reads a whole file, decompressing it when its name ends in `.gz`."""
  with open(path, 'rb') as f:
    raw = f.read()
  if not path.endswith('.gz'):
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'{path}: corrupt gzip stream ({type(e).__name__}: {e}).') from e


def _read_idx(path: str, magic: int, kind: str) -> tuple[tuple[int, ...], bytes]:
  """Parses an IDX header (big-endian) and returns (dims, payload) after checking sizes."""
  data = _read_file_bytes(path)
  ndim = magic & 0xFF  # The low byte of the magic is the number of dimensions.
  header_size = 4 + 4 * ndim
  if len(data) >= 4:
    found = int.from_bytes(data[:4], 'big')
    if found != magic:
      hint = (
        ' (the data looks gzip-compressed: name the file *.gz)' if (data[:2] == b'\x1f\x8b') else ''
      )
      raise DataError(
        f'{path}: wrong magic number for an IDX {kind} file: expected 0x{magic:08X}, '
        f'found 0x{found:08X}{hint}.'
      )
  if len(data) < header_size:
    raise DataError(
      f'{path}: truncated IDX {kind} header: expected {header_size} bytes, found {len(data)}.'
    )
  dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim))
  payload = data[header_size:]
  expected = math.prod(dims)
  if len(payload) != expected:
    problem = 'truncated data' if len(payload) < expected else 'excess data'
    raise DataError(
      f'{path}: {problem}: header dims {dims} need {expected} bytes, found {len(payload)}.'
    )
  return dims, payload


def read_idx_images(path: str) -> np.ndarray:
  """Reads an IDX image file (optionally .gz) into (N, 28, 28, 1) uint8, validating it."""
  dims, payload = _read_idx(path, _IDX_IMAGES_MAGIC, 'images')
  n, rows, cols = dims
  if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
    raise DataError(
      f'{path}: wrong image size: expected {IMAGE_SIZE}x{IMAGE_SIZE}, found {rows}x{cols}.'
    )
  return np.frombuffer(payload, dtype=np.uint8).reshape(n, rows, cols, 1)


def read_idx_labels(path: str) -> np.ndarray:
  """Reads an IDX label file (optionally .gz) into (N,) int32, validating its structure."""
  _, payload = _read_idx(path, _IDX_LABELS_MAGIC, 'labels')
  return np.frombuffer(payload, dtype=np.uint8).astype(np.int32)


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  """Raises a DataError when a label lies outside [0, num_classes)."""
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    i = int(np.argmax(bad))
    raise DataError(
      f'{where}: label out of range: expected values in [0, {num_classes}), '
      f'found {int(labels[i])} at index {i} ({int(bad.sum())} bad labels).'
    )


def _find_idx_file(directory: str, base: str) -> str | None:
  """Returns the path of `base` or `base.gz` in `directory` (plain file preferred)."""
  for name in (base, base + '.gz'):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def load_idx(directory: str, info: DatasetInfo) -> tuple[Split, Split]:
  """Loads (official train, official test) from the four IDX files in `directory`."""
  paths = {key: _find_idx_file(directory, base) for key, base in IDX_FILES.items()}
  missing = [IDX_FILES[key] for key, path in paths.items() if path is None]
  if missing:
    looked_for = ', '.join(f'{base} or {base}.gz' for base in missing)
    state = '' if os.path.isdir(directory) else ' (the directory does not exist)'
    raise DataError(f'Missing IDX files in {directory}{state}: looked for {looked_for}.')
  splits = []
  for part in ('train', 'test'):
    images_path, labels_path = paths[f'{part}_images'], paths[f'{part}_labels']
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if images.shape[0] != labels.shape[0]:
      raise DataError(
        f'Count mismatch: {images_path} holds {images.shape[0]} images but '
        f'{labels_path} holds {labels.shape[0]} labels.'
      )
    _check_labels(labels, info.num_classes, labels_path)
    splits.append(Split(images, labels))
  return splits[0], splits[1]


# ----------------------------------------------------------------------------------------
# TFDS


def _tfds_options(name: str) -> str:
  """What a user can do when TFDS cannot provide the data."""
  files = ', '.join(IDX_FILES.values())
  return (
    f'Options: (a) set data.source=idx and data.idx_dir=<dir> (or ${DATA_DIR_ENV}=<root> '
    f'with the files in <root>/{name}/) holding {files} (each optionally .gz); '
    f'(b) install tensorflow and, with network access, run '
    f"tfds.builder('{name}', data_dir=...).download_and_prepare(file_format='array_record') "
    f'once, then use data.source=tfds with data.tfds_data_dir.'
  )


def _read_tfds_split(source, where: str, num_classes: int) -> Split:
  """Reads every record of a TFDS data source (`ds[i]`) into one in-memory Split."""
  n = len(source)
  images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
  labels = np.empty((n,), np.int32)
  for i in range(n):
    record = source[i]
    image = np.asarray(record['image'])
    if image.shape != images.shape[1:] or image.dtype != np.uint8:
      raise DataError(
        f'{where}: record {i}: expected a (28, 28, 1) uint8 image, '
        f'found {image.shape} {image.dtype}.'
      )
    images[i] = image
    labels[i] = int(record['label'])
  _check_labels(labels, num_classes, where)
  return Split(images, labels)


def _load_tfds(name: str, data_dir: str | None, download: bool) -> tuple[Split, Split, str]:
  """Loads TFDS train/test; raises a DataError saying what was tried (without options)."""
  info = dataset_info(name)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # Any failure of TFDS itself is reported, not crashed on.
    raise DataError(f'tfds.builder({name!r}) failed: {type(e).__name__}: {e}') from e
  location = str(builder.data_dir)
  prepared = builder.is_prepared()
  if not prepared:
    if not download:
      raise DataError(f'TFDS {name!r} is not prepared in {location}.')
    logging.info('TFDS %r is not prepared in %s; trying download_and_prepare.', name, location)
    try:
      builder.download_and_prepare(file_format='array_record')
    except Exception as e:  # No network, no TensorFlow, missing module, ...
      raise DataError(
        f'TFDS {name!r}: no prepared copy in {location}; then '
        f"download_and_prepare(file_format='array_record') failed: "
        f'{type(e).__name__}: {e}'
      ) from e
  try:
    sources = tfds.data_source(name, split=['train', 'test'], data_dir=data_dir, download=False)
  except Exception as e:  # E.g. prepared as TFRecord, which has no random access.
    raise DataError(
      f'TFDS {name!r} in {location} cannot be opened as a random-access data source: '
      f'{type(e).__name__}: {e}'
    ) from e
  train, test = (
    _read_tfds_split(src, f'TFDS {name}/{split} in {location}', info.num_classes)
    for src, split in zip(sources, ('train', 'test'))
  )
  how = 'prepared' if prepared else 'downloaded and prepared'
  return train, test, f'TFDS {name} ({how}) in {location}'


def _load_tfds_with_options(
  name: str, data_dir: str | None, download: bool
) -> tuple[Split, Split, str]:
  """`_load_tfds`, with the alternatives appended to its error message."""
  try:
    return _load_tfds(name, data_dir, download)
  except DataError as e:
    raise DataError(f'{e}\n{_tfds_options(name)}') from e


def load_tfds(name: str, data_dir: str | None = None, download: bool = True) -> tuple[Split, Split]:
  """Loads (official train, official test) through `tfds.data_source`.

  When the dataset is not prepared in `data_dir` and `download` is true, tries
  `download_and_prepare(file_format='array_record')` first. Any failure becomes one
  DataError stating what was tried and what the alternatives are.
  """
  train, test, _ = _load_tfds_with_options(name, data_dir, download)
  return train, test


# ----------------------------------------------------------------------------------------
# Source selection and splits


def _idx_directory(data_config) -> str | None:
  """The IDX directory: data.idx_dir, else $BCAM_DATA_DIR/<name>, else None."""
  if data_config.idx_dir:
    return os.path.expanduser(data_config.idx_dir)
  root = os.environ.get(DATA_DIR_ENV)
  if root:
    return os.path.join(os.path.expanduser(root), data_config.name)
  return None


def _load_idx_source(data_config, info: DatasetInfo) -> tuple[Split, Split, str]:
  """Loads the IDX source named by the config, or raises a DataError saying why not."""
  directory = _idx_directory(data_config)
  if directory is None:
    raise DataError(
      f'No IDX directory: data.idx_dir is empty and ${DATA_DIR_ENV} is not set (set '
      f'data.idx_dir=<dir>, or ${DATA_DIR_ENV}=<root> with the files in <root>/{info.name}/).'
    )
  train, test = load_idx(directory, info)
  return train, test, f'IDX files in {directory}'


def _load_auto(data_config, info: DatasetInfo, tfds_dir: str | None) -> tuple[Split, Split, str]:
  """Prepared TFDS, then IDX files, then a TFDS download; one DataError if all fail."""
  attempts = (
    ('prepared TFDS', lambda: _load_tfds(info.name, tfds_dir, download=False)),
    ('IDX files', lambda: _load_idx_source(data_config, info)),
    ('TFDS download', lambda: _load_tfds(info.name, tfds_dir, download=True)),
  )
  failures = []
  for label, attempt in attempts:
    try:
      return attempt()
    except DataError as e:
      logging.info('Data source %s for %r unavailable: %s', label, info.name, e)
      failures.append(f'  - {label}: {e}')
  raise DataError(
    f'Could not load dataset {info.name!r} (data.source=auto). Tried, in order:\n'
    + '\n'.join(failures)
    + '\n'
    + _tfds_options(info.name)
  )


def split_train_val(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
  """Deterministically moves `val_size` examples of `train` (seeded permutation) to validation.

  Both parts keep the original order of their examples.
  """
  n = len(train)
  if (
    isinstance(val_size, bool)
    or not isinstance(val_size, (int, np.integer))
    or not (1 <= val_size < n)
  ):
    raise DataError(
      f'val_size must be an integer in [1, {n}) for a train set of {n} examples, got {val_size!r}.'
    )
  order = np.random.default_rng(seed).permutation(n)
  val_idx, train_idx = np.sort(order[:val_size]), np.sort(order[val_size:])
  return (
    Split(train.images[train_idx], train.labels[train_idx]),
    Split(train.images[val_idx], train.labels[val_idx]),
  )


def load_datasets(data_config) -> Datasets:
  """Loads train/val/test of `data_config.name` from `data_config.source` (auto/tfds/idx).

  `data_config` needs the attributes name, source, idx_dir, tfds_data_dir, val_size and
  split_seed (an ml_collections ConfigDict or any attribute object).
  """
  info = dataset_info(data_config.name)
  tfds_dir = os.path.expanduser(data_config.tfds_data_dir) if data_config.tfds_data_dir else None
  if data_config.source == 'tfds':
    train, test, source = _load_tfds_with_options(info.name, tfds_dir, download=True)
  elif data_config.source == 'idx':
    train, test, source = _load_idx_source(data_config, info)
  elif data_config.source == 'auto':
    train, test, source = _load_auto(data_config, info, tfds_dir)
  else:
    raise DataError(f'Unknown data.source {data_config.source!r}; valid: auto, tfds, idx.')
  train, val = split_train_val(train, data_config.val_size, data_config.split_seed)
  logging.info(
    'Loaded %s from %s: train %d, val %d (split_seed %d), test %d.',
    info.name,
    source,
    len(train),
    len(val),
    data_config.split_seed,
    len(test),
  )
  return Datasets(info=info, train=train, val=val, test=test, source=source)


# ----------------------------------------------------------------------------------------
# Batching


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder is dropped)."""
  if batch_size < 1 or batch_size > num_examples:
    raise DataError(
      f'batch_size must be in [1, {num_examples}] for {num_examples} training examples, '
      f'got {batch_size}.'
    )
  return num_examples // batch_size


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The (read-only) example order of one epoch, derived only from (seed, epoch)."""
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  order.setflags(write=False)
  return order


def train_batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices (int64, length batch_size) of the training batch of global step `step`.

  A pure function of its arguments, so a resumed run sees the same batches; each epoch
  visits every example at most once (exactly once when batch_size divides num_examples).
  """
  if step < 0:
    raise DataError(f'step must be >= 0, got {step}.')
  spe = steps_per_epoch(num_examples, batch_size)
  epoch, position = divmod(int(step), spe)
  order = _epoch_order(int(num_examples), int(seed), epoch)
  return order[position * batch_size : (position + 1) * batch_size].astype(np.int64)


def eval_batches(
  split: Split, batch_size: int
) -> collections.abc.Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields (images, labels, mask) batches of exactly `batch_size`, in order.

  The last batch is zero-padded with mask False on the padding, so masked sums count each
  example exactly once while every batch keeps one shape (one compilation).
  """
  if batch_size < 1:
    raise DataError(f'batch_size must be >= 1, got {batch_size}.')
  n = len(split)
  for start in range(0, n, batch_size):
    images = split.images[start : start + batch_size]
    labels = split.labels[start : start + batch_size]
    valid = len(labels)
    mask = np.zeros((batch_size,), bool)
    mask[:valid] = True
    if valid < batch_size:
      pad = batch_size - valid
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
    yield images, labels, mask


# ----------------------------------------------------------------------------------------
# Preprocessing and prototypes


def to_pixels(images, image_size: int) -> jax.Array:
  """uint8 (N, H, W, C) -> float32 pixels in [0, 1] at (N, image_size, image_size, C).

  Resizes bilinearly when needed, on device, so no resized copy is ever stored; jittable
  with `image_size` static. This is the space where explanations mask images (0 = black).
  """
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  n, height, width, channels = x.shape
  if (height, width) != (image_size, image_size):
    x = jax.image.resize(x, (n, image_size, image_size, channels), method='bilinear')
  return x


def normalize(pixels: jax.Array, mean: float, std: float, dtype=jnp.float32) -> jax.Array:
  """[0, 1] pixels -> the model's input (x - mean) / std in `dtype`, computed in at least
  float32 (in float64 for a float64 model, so its input carries no float32 rounding)."""
  x = pixels.astype(jnp.promote_types(dtype, jnp.float32))
  return ((x - mean) / std).astype(dtype)


def preprocess(images, mean: float, std: float, image_size: int, dtype=jnp.float32) -> jax.Array:
  """uint8 (N, H, W, C) -> normalised `dtype` (N, image_size, image_size, C); jittable:
  `to_pixels` then `normalize`."""
  return normalize(to_pixels(images, image_size), mean, std, dtype)


def class_prototypes(split: Split, num_classes: int, image_size: int) -> np.ndarray:
  """Per-class mean image of `split` at `image_size`, min-max scaled per class to [0, 1].

  The mean is taken at 28x28 in float64 and then resized with the bilinear
  `jax.image.resize` of `preprocess` (resizing is linear, so this equals the mean of the
  resized images). Returns (num_classes, image_size, image_size) float32; a constant
  image scales to zeros.
  """
  images = split.images[..., 0]
  means = np.empty((num_classes,) + images.shape[1:], np.float64)
  empty = []
  for c in range(num_classes):
    members = images[split.labels == c]
    if len(members) == 0:
      empty.append(c)
    else:
      means[c] = members.mean(axis=0, dtype=np.float64) / 255.0
  if empty:
    raise DataError(f'No examples of class(es) {empty} in the split: cannot build prototypes.')
  protos = means.astype(np.float32)
  if protos.shape[1:] != (image_size, image_size):
    protos = np.asarray(
      jax.image.resize(protos, (num_classes, image_size, image_size), method='bilinear')
    )
  low = protos.min(axis=(1, 2), keepdims=True)
  high = protos.max(axis=(1, 2), keepdims=True)
  return ((protos - low) / np.maximum(high - low, _MINMAX_EPS)).astype(np.float32)


def load_or_compute_prototypes(
  workdir: str, datasets: Datasets, image_size: int, write: bool = True
) -> dict[str, np.ndarray]:
  """Class prototypes of the train and val splits, cached in `workdir` for resume.

  Saves `prototypes_{train,val}.npy` (atomically) and `.png` grids unless `write` is
  False (the other processes of a multi-process job: every process computes the same
  prototypes, process 0 writes them). Saved arrays are
  reused when their shape matches; a mismatch (e.g. image_size changed) is a DataError
  rather than a silent overwrite.
  """
  info = datasets.info
  expected = (info.num_classes, image_size, image_size)
  os.makedirs(workdir, exist_ok=True)
  titles = [f'{c}: {name}' if name != str(c) else name for c, name in enumerate(info.class_names)]
  result = {}
  for split_name in ('train', 'val'):
    npy = os.path.join(workdir, f'prototypes_{split_name}.npy')
    png = os.path.join(workdir, f'prototypes_{split_name}.png')
    if os.path.exists(npy):
      try:
        protos = np.load(npy)
      except (OSError, ValueError) as e:
        raise DataError(f'{npy}: cannot be read ({e}); delete it to recompute.') from e
      if protos.shape != expected:
        raise DataError(
          f'{npy}: saved prototypes have shape {protos.shape}, expected {expected} '
          f'(num_classes, image_size, image_size); was image_size changed? Use a new '
          f'workdir or delete the file to recompute.'
        )
      protos = protos.astype(np.float32)
      logging.info('Reusing %s prototypes from %s.', split_name, npy)
    else:
      protos = class_prototypes(getattr(datasets, split_name), info.num_classes, image_size)
      if write:
        io_utils.atomic_write(npy, functools.partial(np.save, arr=protos))
        logging.info('Computed %s prototypes %s -> %s.', split_name, protos.shape, npy)
    if write and not os.path.exists(png):
      figures.save_image_grid(png, protos, titles)
    result[split_name] = protos
  return result
