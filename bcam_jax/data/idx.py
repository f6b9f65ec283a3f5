"""The standard IDX files of MNIST and Fashion-MNIST (optionally gzipped), parsed with
numpy and validated: magic numbers, dimensions, counts and label range."""

import gzip
import math
import os
import zlib

import numpy as np

from bcam_jax.data.dataset import IMAGE_SIZE, DataError, DatasetInfo, Split, check_labels

IDX_FILES = {
  'train_images': 'train-images-idx3-ubyte',
  'train_labels': 'train-labels-idx1-ubyte',
  'test_images': 't10k-images-idx3-ubyte',
  'test_labels': 't10k-labels-idx1-ubyte',
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte data, 3 dimensions (n, rows, cols)
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte data, 1 dimension (n)


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


def find_idx_file(directory: str, base: str) -> str | None:
  """Returns the path of `base` or `base.gz` in `directory` (plain file preferred)."""
  for name in (base, base + '.gz'):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def load_idx(directory: str, info: DatasetInfo) -> tuple[Split, Split]:
  """Loads (official train, official test) from the four IDX files in `directory`."""
  paths = {key: find_idx_file(directory, base) for key, base in IDX_FILES.items()}
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
    check_labels(labels, info.num_classes, labels_path)
    splits.append(Split(images, labels))
  return splits[0], splits[1]
