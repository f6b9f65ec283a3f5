"""Class prototypes: the per-class mean image of a split, min-max scaled to [0, 1], which
the CAM losses compare explanations with. Computed once per workdir and reused on resume.

A CAM map has no channels, so a colour dataset's prototype is the grayscale of its mean
image: ITU-R 601-2 luma (0.299 R + 0.587 G + 0.114 B, Pillow's 'L' conversion) of the
per-channel mean, which equals the mean of the grayscale images as the luma is linear.
"""

import functools
import os

import jax
import numpy as np
from absl import logging

from bcam_jax import io_utils
from bcam_jax.data import DataError, Datasets, Split
from bcam_jax.data.streaming import is_streamed, streamed_class_means
from bcam_jax.report import figures

_MINMAX_EPS = 1e-8
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2, as Pillow's convert('L').


def grayscale(images: np.ndarray) -> np.ndarray:
  """(..., C) -> (...): the only channel of C = 1, the ITU-R 601-2 luma of C = 3; a
  ValueError for other channel counts, which have no agreed grayscale."""
  channels = images.shape[-1]
  if channels == 1:
    return images[..., 0]
  if channels == 3:
    return images @ np.asarray(LUMA_WEIGHTS, images.dtype)
  raise ValueError(
    f'images of shape {images.shape}: expected 1 (grayscale) or 3 (RGB) channels for a prototype.'
  )


def class_prototypes(split: Split, num_classes: int, image_size: int) -> np.ndarray:
  """Per-class mean image of `split` at `image_size`, min-max scaled per class to [0, 1].

  The mean is taken at the split's size in float64 (per channel, then `grayscale`) and
  resized with the bilinear
  `jax.image.resize` of `preprocess` (resizing is linear, so this equals the mean of the
  resized images). Returns (num_classes, image_size, image_size) float32; a constant
  image scales to zeros.
  """
  images = split.images
  means = np.empty((num_classes,) + images.shape[1:3], np.float64)
  empty = []
  # A streamed split: the class means of one chunked pass (exact int64 sums, so the same
  # float64 means as below).
  streamed = streamed_class_means(split, num_classes) if is_streamed(split) else None
  for c in range(num_classes):
    if streamed is not None:
      count, mean = streamed[1][c], streamed[0][c]
    else:
      members = images[split.labels == c]
      count = len(members)
      mean = members.mean(axis=0, dtype=np.float64) / 255.0 if count else None
    if count == 0:
      empty.append(c)
    else:
      means[c] = grayscale(mean)
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
      figures.save_image_grid(
        png, protos, titles, f'{info.name} {split_name} prototypes: mean image of each class'
      )
    result[split_name] = protos
  return result
