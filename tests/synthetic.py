"""Tiny learnable MNIST-like data written as real IDX files, for tests that train.

Class c is a bright 6x6 square at a class-specific position plus uniform noise, so a small
model separates the classes within a few dozen steps.
"""

import gzip
import os
import struct

import numpy as np


def make_images(labels: np.ndarray, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
  for i, c in enumerate(labels):
    r, q = divmod(int(c), 4)
    images[i, 2 + 8 * r : 8 + 8 * r, 2 + 6 * q : 8 + 6 * q] = 255
  return images


def idx_bytes(array, magic=None, dims=None) -> bytes:
  """IDX encoding: big-endian magic (0x0800 | ndim for uint8) and dims, then raw uint8.

  `magic` and `dims` override the header, to write corrupt files.
  """
  array = np.asarray(array, np.uint8)
  magic = 0x0800 | array.ndim if magic is None else magic
  dims = array.shape if dims is None else dims
  return struct.pack('>I', magic) + b''.join(struct.pack('>I', d) for d in dims) + array.tobytes()


def write_idx(path: str, array: np.ndarray, compress: bool = False) -> str:
  """Writes `array` (uint8, 1-D labels or 3-D images) in the IDX format."""
  payload = idx_bytes(array)
  if compress:
    path += '.gz'
    payload = gzip.compress(payload)
  with open(path, 'wb') as f:
    f.write(payload)
  return path


def write_dataset(
  directory: str,
  n_train: int = 240,
  n_test: int = 60,
  num_classes: int = 10,
  seed: int = 0,
  compress: bool = False,
) -> str:
  """The four standard IDX files of a synthetic dataset in `directory`."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  for prefix, n in (('train', n_train), ('t10k', n_test)):
    labels = rng.integers(0, num_classes, size=n).astype(np.uint8)
    write_idx(
      os.path.join(directory, f'{prefix}-images-idx3-ubyte'),
      make_images(labels, seed + n),
      compress,
    )
    write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte'), labels, compress)
  return directory
