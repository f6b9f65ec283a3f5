"""Datasets through `tfds.data_source`: random access over ArrayRecord, no TensorFlow once
the dataset is prepared; preparing it needs network access and TensorFlow."""

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from bcam_jax.data.dataset import (
  DATA_DIR_ENV,
  IMAGE_SIZE,
  DataError,
  Split,
  check_labels,
  dataset_info,
)
from bcam_jax.data.idx import IDX_FILES


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
