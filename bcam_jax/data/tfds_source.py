"""Datasets through `tfds.data_source`: random access over ArrayRecord, no TensorFlow once
the dataset is prepared; preparing it needs network access and TensorFlow
(``pip install bcam-jax[tfds-prepare]``).

Two readers:

* `load_tfds` (and `load_tfds_noted`): MNIST and Fashion-MNIST, the catalogue datasets of
  `bcam_jax.data.dataset`, read as they are (28x28x1) into memory;
* `open_tfds`: any TFDS image-classification dataset by name (cifar10, imagenette,
  oxford_iiit_pet, ...), its class names, channel count and splits read from the dataset's
  info, each split a random-access record source (`TfdsRecords`) whose images are converted
  and resized (shorter side) + centre-cropped as an image folder's are
  (`bcam_jax.data.folder.conform_image`).

Splits of `open_tfds`: ``train`` is required; the test split is ``test``, else
``validation`` (e.g. imagenette, which has no ``test``); the validation split is
``validation`` when the dataset has both, else none (the caller carves one out of train).
"""

import dataclasses
import functools
import importlib.util

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from bcam_jax.data.dataset import (
  DATA_DIR_ENV,
  IMAGE_SIZE,
  DataError,
  Split,
  check_labels,
  dataset_info,
)
from bcam_jax.data.folder import conform_image
from bcam_jax.data.idx import IDX_FILES

PREPARE_EXTRA = 'pip install "bcam-jax[tfds-prepare]"'
IMAGE_KEY, LABEL_KEY = 'image', 'label'  # The features of TFDS image classification.


def tfds_alternatives(name: str) -> str:
  """What a user can do when TFDS cannot provide the data."""
  files = ', '.join(IDX_FILES.values())
  return (
    f'Options: (a) set data.source=idx and data.idx_dir=<dir> (or ${DATA_DIR_ENV}=<root> '
    f'with the files in <root>/{name}/) holding {files} (each optionally .gz); '
    f'(b) install tensorflow and, with network access, run '
    f"tfds.builder('{name}', data_dir=...).download_and_prepare(file_format='array_record') "
    f'once, then use data.source=tfds with data.tfds_data_dir; '
    f'(c) set data.source=download to fetch the IDX files without TensorFlow.'
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
  check_labels(labels, num_classes, where)
  return Split(images, labels)


def load_tfds_noted(name: str, data_dir: str | None, download: bool) -> tuple[Split, Split, str]:
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


def load_tfds_with_alternatives(
  name: str, data_dir: str | None, download: bool
) -> tuple[Split, Split, str]:
  """`load_tfds_noted`, with the alternatives appended to its error message."""
  try:
    return load_tfds_noted(name, data_dir, download)
  except DataError as e:
    raise DataError(f'{e}\n{tfds_alternatives(name)}') from e


def load_tfds(name: str, data_dir: str | None = None, download: bool = True) -> tuple[Split, Split]:
  """Loads (official train, official test) through `tfds.data_source`.

  When the dataset is not prepared in `data_dir` and `download` is true, tries
  `download_and_prepare(file_format='array_record')` first. Any failure becomes one
  DataError stating what was tried and what the alternatives are.
  """
  train, test, _ = load_tfds_with_alternatives(name, data_dir, download)
  return train, test


@dataclasses.dataclass(frozen=True)
class TfdsRecords:
  """One split of a TFDS dataset as a record source: `len(records)` and
  `records[i] -> (uint8 (image_size, image_size, channels) image, int label)`.

  Reads record `i` from the ArrayRecord data source on each access (no TensorFlow); an image
  already of the target shape is returned as is, any other is converted to grey or RGB and
  resized + centre-cropped by `conform_image`, as image folders are. A DataError naming the
  split and the record for an image that is not uint8 or a label outside the classes.
  """

  source: object  # What tfds.data_source returns for one split.
  where: str
  image_size: int
  channels: int
  num_classes: int

  def __len__(self) -> int:
    return len(self.source)

  @functools.cached_property
  def labels(self) -> np.ndarray:
    """Every record's label (int32), read once: what a streamed split keeps in memory."""
    return np.array([int(self.source[i][LABEL_KEY]) for i in range(len(self))], np.int32)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    record = self.source[index]
    image = np.asarray(record[IMAGE_KEY])
    label = int(record[LABEL_KEY])
    if not 0 <= label < self.num_classes:
      raise DataError(
        f'{self.where}: record {index}: label {label} outside [0, {self.num_classes}).'
      )
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise DataError(
        f'{self.where}: record {index}: expected a uint8 (H, W[, C]) image, found '
        f'{image.dtype} {image.shape}.'
      )
    if image.ndim == 2:
      image = image[..., None]
    target = (self.image_size, self.image_size, self.channels)
    if image.shape == target:
      return image, label
    if image.shape[-1] not in (1, 3, 4):
      raise DataError(
        f'{self.where}: record {index}: an image of {image.shape[-1]} channels {image.shape}; '
        'expected 1 (grey), 3 (RGB) or 4 (RGBA).'
      )
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return conform_image(pil, self.channels, self.image_size), label


@dataclasses.dataclass(frozen=True)
class TfdsDataset:
  """A TFDS image-classification dataset opened by `open_tfds`.

  `splits` maps 'train', 'test' and, when the dataset has both 'validation' and 'test',
  'val' to their record sources; `split_names` maps the same roles to the dataset's own
  split names; `location` is the prepared dataset's folder.
  """

  name: str
  location: str
  class_names: tuple[str, ...]
  channels: int
  image_size: int
  splits: dict[str, TfdsRecords]
  split_names: dict[str, str]
  prepared_now: bool

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _tensorflow_missing() -> bool:
  return importlib.util.find_spec('tensorflow') is None


def prepare_command(name: str, data_dir: str | None) -> str:
  """The shell command preparing `name` as ArrayRecord in `data_dir` (needs TensorFlow)."""
  where = f', data_dir={data_dir!r}' if data_dir else ''
  return (
    f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}'{where})"
    f".download_and_prepare(file_format='array_record')\""
  )


def _prepare(builder, name: str, data_dir: str | None, location: str) -> None:
  """Downloads and prepares `builder` as ArrayRecord, or a DataError saying what to run."""
  if _tensorflow_missing():
    raise DataError(
      f'TFDS dataset {name!r} is not prepared in {location}, and preparing it needs '
      f'TensorFlow, which is not installed. Run `{PREPARE_EXTRA}` (it installs tensorflow), '
      f'then rerun with network access, or prepare it once with:\n  '
      f'{prepare_command(name, data_dir)}\nand pass that data_dir as data.tfds_data_dir.'
    )
  logging.info('TFDS %r is not prepared in %s; running download_and_prepare.', name, location)
  try:
    builder.download_and_prepare(file_format='array_record')
  except Exception as e:  # No network, a manual download, ...: report what failed.
    raise DataError(
      f"TFDS {name!r}: download_and_prepare(file_format='array_record') into {location} "
      f'failed: {type(e).__name__}: {e}'
    ) from e


def _image_label_features(info, name: str) -> tuple[tuple[str, ...], int | None]:
  """Class names and channel count (None when the info leaves it open) of an image
  classification dataset's features; a DataError when it has no image and label."""
  features = info.features
  keys = list(features.keys()) if hasattr(features, 'keys') else []
  if IMAGE_KEY not in keys or LABEL_KEY not in keys:
    raise DataError(
      f'TFDS {name!r} is not an image classification dataset this library reads: expected '
      f"the features '{IMAGE_KEY}' and '{LABEL_KEY}', found {keys}."
    )
  label = features[LABEL_KEY]
  num_classes = getattr(label, 'num_classes', None)
  if not num_classes:
    raise DataError(f"TFDS {name!r}: feature '{LABEL_KEY}' is not a class label ({label}).")
  names = tuple(label.names) if getattr(label, 'names', None) else ()
  if len(names) != num_classes:
    names = tuple(str(c) for c in range(num_classes))
  shape = tuple(features[IMAGE_KEY].shape)
  channels = shape[-1] if len(shape) == 3 else 1 if len(shape) == 2 else None
  return names, channels


def _split_roles(available: list[str], name: str, location: str) -> tuple[dict[str, str], str]:
  """{'train', 'test'[, 'val']} -> the dataset's split names, and a note for the log."""
  if 'train' not in available:
    raise DataError(f"TFDS {name!r} in {location} has no 'train' split (splits: {available}).")
  if 'test' in available:
    roles = {'train': 'train', 'test': 'test'}
    if 'validation' in available:
      roles['val'] = 'validation'
      return roles, "its 'validation' split is the validation split"
    return roles, ''
  if 'validation' in available:
    return (
      {'train': 'train', 'test': 'validation'},
      "no 'test' split: its 'validation' split is the test split",
    )
  raise DataError(
    f"TFDS {name!r} in {location} has neither a 'test' nor a 'validation' split to test on "
    f'(splits: {available}).'
  )


def open_tfds(
  name: str, data_dir: str | None, image_size: int, channels: int | None = None
) -> TfdsDataset:
  """Opens the TFDS image-classification dataset `name` as record sources (module docstring).

  Prepares it first (download_and_prepare as ArrayRecord, which needs TensorFlow and network
  access) when it is not prepared in `data_dir`. `channels` None takes the channel count
  from the dataset's info (3 when the info leaves it open or has 4); 1 or 3 converts. Every
  failure is a DataError naming the dataset, its folder and what to do.
  """
  if channels not in (None, 1, 3):
    raise DataError(f'channels must be None (from the dataset), 1 or 3; got {channels!r}.')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # Unknown name, broken installation, ...
    raise DataError(f'tfds.builder({name!r}) failed: {type(e).__name__}: {e}') from e
  location = str(builder.data_dir)
  prepared_now = not builder.is_prepared()
  if prepared_now:
    _prepare(builder, name, data_dir, location)
  class_names, info_channels = _image_label_features(builder.info, name)
  if channels is None:
    channels = info_channels if info_channels in (1, 3) else 3
  roles, note = _split_roles(list(builder.info.splits), name, location)
  try:
    sources = tfds.data_source(name, split=list(roles.values()), data_dir=data_dir, download=False)
  except Exception as e:  # E.g. prepared as TFRecord, which has no random access.
    raise DataError(
      f'TFDS {name!r} in {location} cannot be opened as a random-access data source '
      f"(prepare it with file_format='array_record'): {type(e).__name__}: {e}"
    ) from e
  splits = {
    role: TfdsRecords(
      source, f'TFDS {name}/{split} in {location}', image_size, channels, len(class_names)
    )
    for (role, split), source in zip(roles.items(), sources)
  }
  if note:
    logging.info('TFDS %s: %s.', name, note)
  return TfdsDataset(
    name=name,
    location=location,
    class_names=class_names,
    channels=channels,
    image_size=image_size,
    splits=splits,
    split_names=roles,
    prepared_now=prepared_now,
  )
