"""`load_datasets`: the train, validation and test splits of a config's dataset.

``data.source`` picks ``tfds``, ``idx``, ``download`` (IDX files fetched into the cache) or
``auto`` (a prepared TFDS copy, then IDX files in the data folder or cache, then a download
of the IDX files, then a TFDS preparation, reporting every attempt when all fail); the
validation split is a seeded subset of the official train split.

``data.source='folder'`` reads the image folder ``data.folder_dir`` instead
(`bcam_jax.data.folder`): images resized and centre-cropped to ``data.image_size``, its
``val`` split when it has one (else the seeded subset of train), class names from its class
folders, ``data.channels`` channels (0: from the images) and the per-channel mean and std of
its train split; ``data.name`` is then only the label of the data in logs and figures.

``data.source='tfds'`` with a ``data.name`` outside the catalogue (anything but mnist and
fashion_mnist) reads that TFDS image-classification dataset by name
(`bcam_jax.data.tfds_source.open_tfds`): class names and channels from its info, images
resized and centre-cropped to ``data.image_size`` as a folder's are, its ``validation``
split as the validation split (or as the test split when it has no ``test``), and the
per-channel mean and std of its train split.

The mean and std of a folder or a TFDS dataset by name are cached in
``<stats_dir>/data_stats.json`` (`bcam_jax.data.stats_cache`; the workdir in training and
evaluation). A folder too large for memory is streamed instead (``data.stream``,
`streaming`).
"""

import dataclasses
import os

import numpy as np
from absl import logging

from bcam_jax.data import streaming
from bcam_jax.data.augment import AugmentOptions
from bcam_jax.data.dataset import (
  DATA_DIR_ENV,
  DATASETS,
  DataError,
  DatasetInfo,
  Datasets,
  Split,
  dataset_info,
)
from bcam_jax.data.download import dataset_dir, download_dataset, offline_fix
from bcam_jax.data.idx import load_idx
from bcam_jax.data.records import SplitRecords
from bcam_jax.data.stats_cache import load_or_compute_stats
from bcam_jax.data.tfds_source import (
  load_tfds_noted,
  load_tfds_with_alternatives,
  open_tfds,
)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Which data a run reads and how (`config.data`; the module docstring says what each
  source does).

  Attributes:
    name: a catalogue dataset (`DATASETS`), a TFDS name, or a folder's label.
    source: 'auto', 'tfds', 'idx', 'download' or 'folder'.
    folder_dir: the image folder of source 'folder'.
    channels: 0 for the images' own, else 1 or 3.
    prototypes: the class prototypes, 'luma' (the grayscale of each class's mean image),
      'channels' or 'file' (`bcam_jax.prototypes`).
    prototypes_file: the `.npy` maps of prototypes 'file'.
    prototypes_from: the images whose class means they are, 'split' or 'pooled'.
    idx_dir: the IDX files' directory; '' for $BCAM_DATA_DIR/<name>.
    tfds_data_dir: TFDS's data directory; '' for TFDS's own.
    val_size: the seeded validation subset of train.
    test_size: a seeded subset of the test split (0: all of it).
    split_seed: the seed of both subsets.
    image_size: the side images are resized to.
    normalization: 'dataset' (the literature constants, else the train split's mean and
      std), 'imagenet' or 'auto' (resolved by `run_spec.RunSpec.normalization`: ImageNet's
      with pretrained weights).
    stream: 'stream', 'memory', or 'auto': stream a split from disk when all of them
      decoded would take more than in_memory_limit_mb (`streaming`).
    in_memory_limit_mb: that limit in MiB.
    decode_workers: the threads decoding a streamed split (0: `streaming.default_workers`).
    augment: the train step's augmentations.
  """

  name: str = 'mnist'
  source: str = 'auto'
  folder_dir: str = ''
  channels: int = 0
  prototypes: str = 'luma'
  prototypes_file: str = ''
  prototypes_from: str = 'split'
  idx_dir: str = ''
  tfds_data_dir: str = ''
  val_size: int = 5000
  test_size: int = 0
  split_seed: int = 0
  image_size: int = 28
  normalization: str = 'auto'
  stream: str = 'auto'
  in_memory_limit_mb: float = 2048.0
  decode_workers: int = 0
  augment: AugmentOptions = AugmentOptions()

  @classmethod
  def from_config(cls, data_config) -> 'DataSpec':
    """The spec of `config.data`."""
    values = {f.name: data_config[f.name] for f in dataclasses.fields(cls) if f.name != 'augment'}
    return cls(**values, augment=AugmentOptions.from_config(data_config))


def _idx_directory(spec: DataSpec) -> str | None:
  """The IDX directory: data.idx_dir, else $BCAM_DATA_DIR/<name>, else None."""
  if spec.idx_dir:
    return os.path.expanduser(spec.idx_dir)
  if os.environ.get(DATA_DIR_ENV):
    return dataset_dir(spec.name)
  return None


def _load_idx_source(spec: DataSpec, info: DatasetInfo) -> tuple[Split, Split, str]:
  """Loads the IDX source named by the config, or raises a DataError saying why not."""
  directory = _idx_directory(spec)
  if directory is None:
    raise DataError(
      f'No IDX directory: data.idx_dir is empty and ${DATA_DIR_ENV} is not set (set '
      f'data.idx_dir=<dir>, or ${DATA_DIR_ENV}=<root> with the files in <root>/{info.name}/).'
    )
  return _load_idx_dir(directory, info)


def _load_idx_dir(directory: str, info: DatasetInfo) -> tuple[Split, Split, str]:
  """The IDX files in `directory`, with a note of where they came from."""
  train, test = load_idx(directory, info)
  return train, test, f'IDX files in {directory}'


def _load_downloaded(info: DatasetInfo) -> tuple[Split, Split, str]:
  """The IDX files in the cache (`dataset_dir`), verified and fetched where missing."""
  directory = download_dataset(info.name)
  train, test, _ = _load_idx_dir(directory, info)
  return train, test, f'IDX files in {directory} (SHA-256 verified)'


def _load_auto(spec: DataSpec, info: DatasetInfo, tfds_dir: str | None) -> tuple[Split, Split, str]:
  """Prepared TFDS, IDX files (data.idx_dir, else the data folder or cache), a download of
  the IDX files, then a TFDS preparation; one DataError listing every attempt if all fail."""
  idx_dir = _idx_directory(spec) or dataset_dir(info.name)
  attempts = (
    ('prepared TFDS', lambda: load_tfds_noted(info.name, tfds_dir, download=False)),
    ('IDX files', lambda: _load_idx_dir(idx_dir, info)),
    ('download', lambda: _load_downloaded(info)),
    ('TFDS download', lambda: load_tfds_noted(info.name, tfds_dir, download=True)),
  )
  failures = []
  for label, attempt in attempts:
    try:
      return attempt()
    except DataError as e:
      # Said only when every source fails (the DataError below); a later success is no news.
      logging.debug('Data source %s for %r unavailable: %s', label, info.name, e)
      failures.append(f'  - {label}: {e}')
  raise DataError(
    f'Could not load dataset {info.name!r} (data.source=auto). Tried, in order:\n'
    + '\n'.join(failures)
    + '\n'
    + offline_fix(info.name)
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
  if streaming.is_streamed(train):  # the same examples, still read on demand
    return train.take(train_idx), train.take(val_idx)
  return (
    Split(train.images[train_idx], train.labels[train_idx]),
    Split(train.images[val_idx], train.labels[val_idx]),
  )


def _val_split(train: Split, spec: DataSpec, what: str) -> tuple[Split, Split, str]:
  """(train, val, how) with data.val_size train examples (data.split_seed) as validation."""
  try:
    train, val = split_train_val(train, spec.val_size, spec.split_seed)
  except DataError as e:
    raise DataError(
      f'{what} has no val split, so data.val_size={spec.val_size!r} of its '
      f'{len(train)} train images become the validation split: {e}'
    ) from None
  return train, val, f'{len(val)} of its train images (data.split_seed {spec.split_seed})'


def _train_normalised_info(
  source: str,
  name: str,
  location: str,
  class_names: tuple[str, ...],
  image_size: int,
  channels: int,
  train: Split,
  stats_dir: str | None,
  write_stats: bool,
) -> DatasetInfo:
  """The `DatasetInfo` of data normalised by its train split's per-channel mean and std,
  those read from or written to the cache in `stats_dir` under the key they depend on."""
  key = {
    'source': source,
    'name': name,
    'location': os.path.abspath(location),
    'image_size': int(image_size),
    'channels': int(channels),
    'train_images': len(train),
  }
  mean, std = load_or_compute_stats(stats_dir, key, SplitRecords(train), write_stats)
  return DatasetInfo(
    name=name,
    num_classes=len(class_names),
    mean=mean,
    std=std,
    class_names=class_names,
    channels=channels,
  )


def _log_loaded(what: str, info: DatasetInfo, size: int, splits, how: str) -> None:
  train, val, test = splits
  logging.info(
    'Loaded %s as %r: %d classes, %d channels, %dx%d; train %d, val %d (%s), test %d; '
    'train mean %s, std %s.',
    what,
    info.name,
    info.num_classes,
    info.channels,
    size,
    size,
    len(train),
    len(val),
    how,
    len(test),
    ', '.join(f'{m:.4f}' for m in info.mean),
    ', '.join(f'{s:.4f}' for s in info.std),
  )


def load_folder(spec: DataSpec, stats_dir: str | None = None, write_stats: bool = True) -> Datasets:
  """Train/val/test of the image folder `spec.folder_dir` (the module docstring says
  how); a DataError naming the field when the folder or its train split cannot serve."""
  if not spec.folder_dir:
    raise DataError(
      "data.source='folder' needs data.folder_dir=<root of root/<split>/<class>/*.png|jpg>; "
      'it is empty.'
    )
  root = os.path.expanduser(spec.folder_dir)
  folder = streaming.read_folder_for(spec, root)
  train, test = folder.splits['train'], folder.splits['test']
  info = _train_normalised_info(
    'folder',
    spec.name,
    root,
    folder.class_names,
    folder.image_size,
    folder.channels,
    train,
    stats_dir,
    write_stats,
  )
  if 'val' in folder.splits:
    val, how = folder.splits['val'], f'its val folder, {os.path.join(root, "val")}'
  else:
    train, val, how = _val_split(train, spec, f'Image folder {root}')
  _log_loaded(f'image folder {root}', info, folder.image_size, (train, val, test), how)
  source = f'image folder {root}'
  return Datasets(info=info, train=train, val=val, test=test, source=source)


def load_tfds_by_name(
  spec: DataSpec, stats_dir: str | None = None, write_stats: bool = True
) -> Datasets:
  """Train/val/test of the TFDS image-classification dataset `spec.name` (the module
  docstring says how), in memory or streamed (``data.stream``); a DataError naming the
  dataset when it cannot."""
  data_dir = os.path.expanduser(spec.tfds_data_dir) if spec.tfds_data_dir else None
  ds = open_tfds(spec.name, data_dir, spec.image_size, spec.channels or None)
  what = f'TFDS {ds.name} in {ds.location}'
  shape = (ds.image_size, ds.image_size, ds.channels)
  splits = streaming.record_splits_for(spec, ds.splits, shape, what)
  train, test = splits['train'], splits['test']
  info = _train_normalised_info(
    'tfds',
    ds.name,
    ds.location,
    ds.class_names,
    ds.image_size,
    ds.channels,
    train,
    stats_dir,
    write_stats,
  )
  if 'val' in splits:
    val, how = splits['val'], "its 'validation' split"
  else:
    train, val, how = _val_split(train, spec, what)
  if ds.split_names['test'] != 'test':
    how += f"; test is its {ds.split_names['test']!r} split (it has no 'test')"
  _log_loaded(what, info, ds.image_size, (train, val, test), how)
  how_prepared = 'downloaded and prepared' if ds.prepared_now else 'prepared'
  source = f'TFDS {ds.name} ({how_prepared}) in {ds.location}'
  return Datasets(info=info, train=train, val=val, test=test, source=source)


def load_datasets(
  spec: DataSpec, stats_dir: str | None = None, write_stats: bool = True
) -> Datasets:
  """Loads train/val/test of `spec.name` from `spec.source`
  (auto/tfds/idx/download), or the image folder `spec.folder_dir` (source folder); with
  `spec.test_size`, a seeded subset of that many test images (a quick run's).

  `stats_dir` (the workdir) caches the train mean and std of a folder or a TFDS dataset by
  name, written only when `write_stats`.
  """
  datasets = _load_all(spec, stats_dir, write_stats)
  if 0 < spec.test_size < len(datasets.test):
    test = datasets.test
    order = np.random.default_rng(spec.split_seed).permutation(len(test))
    keep = np.sort(order[: spec.test_size])
    subset = (
      test.take(keep)
      if streaming.is_streamed(test)
      else Split(test.images[keep], test.labels[keep])
    )
    logging.info(
      'Testing on %d of the %d test images (data.test_size=%d; 0 for all of them).',
      len(subset),
      len(test),
      spec.test_size,
    )
    datasets = dataclasses.replace(datasets, test=subset)
  return datasets


def _load_all(spec: DataSpec, stats_dir: str | None, write_stats: bool) -> Datasets:
  if spec.source == 'folder':
    return load_folder(spec, stats_dir, write_stats)
  if spec.source == 'tfds' and spec.name not in DATASETS:
    return load_tfds_by_name(spec, stats_dir, write_stats)
  info = dataset_info(spec.name)
  tfds_dir = os.path.expanduser(spec.tfds_data_dir) if spec.tfds_data_dir else None
  if spec.source == 'tfds':
    train, test, source = load_tfds_with_alternatives(info.name, tfds_dir, download=True)
  elif spec.source == 'idx':
    train, test, source = _load_idx_source(spec, info)
  elif spec.source == 'download':
    try:
      train, test, source = _load_downloaded(info)
    except DataError as e:
      raise DataError(f'{e}\n{offline_fix(info.name)}') from e
  elif spec.source == 'auto':
    train, test, source = _load_auto(spec, info, tfds_dir)
  else:
    raise DataError(
      f'Unknown data.source {spec.source!r}; valid: auto, tfds, idx, download, folder.'
    )
  train, val = split_train_val(train, spec.val_size, spec.split_seed)
  logging.info(
    'Loaded %s from %s: train %d, val %d (split_seed %d), test %d.',
    info.name,
    source,
    len(train),
    len(val),
    spec.split_seed,
    len(test),
  )
  return Datasets(info=info, train=train, val=val, test=test, source=source)
