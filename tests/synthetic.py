"""Tiny learnable data for tests that train: MNIST-like IDX files and RGB image folders.

IDX class c is a bright 6x6 square at a class-specific position plus uniform noise, so a
small model separates the classes within a few dozen steps; `write_folder` does the same in
colour.
"""

import gzip
import os
import struct

import numpy as np
from PIL import Image


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


FOLDER_CLASSES = ('circle', 'square', 'triangle')  # names only; each is a coloured patch


def folder_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
  """An RGB (size, size, 3) uint8 image of class `label`: dark noise with a bright patch of
  the class's colour (red, green, blue) in the class's corner, so colour and place both
  tell the class."""
  image = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
  half = size // 2
  top, left = [(0, 0), (0, half), (half, 0)][label]
  image[top : top + half, left : left + half, label] = 255
  return image


def write_folder(
  root: str, per_class: dict[str, int], size: int = 12, seed: int = 0, ext: str = 'png'
) -> str:
  """An ImageFolder root/<split>/<class>/<k>.<ext> of `folder_image`s: `per_class[split]`
  images of each class in each split."""
  rng = np.random.default_rng(seed)
  for split, n in per_class.items():
    for label, name in enumerate(FOLDER_CLASSES):
      directory = os.path.join(root, split, name)
      os.makedirs(directory, exist_ok=True)
      for k in range(n):
        Image.fromarray(folder_image(label, size, rng)).save(os.path.join(directory, f'{k}.{ext}'))
  return root
