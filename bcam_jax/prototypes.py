"""Class prototypes: one map per class, min-max scaled to [0, 1], which the CAM losses
compare explanations with. Computed once per workdir and reused on resume.

The paper's prototype is the per-class mean image of a split. A CAM map has no channels, so
a colour mean image becomes one map (``data.prototypes``):

* ``'luma'`` (the default): the grayscale of the mean image, ITU-R 601-2 luma (0.299 R +
  0.587 G + 0.114 B, Pillow's 'L' conversion) of the per-channel mean, which equals the mean
  of the grayscale images as the luma is linear;
* ``'channels'``: each channel's mean image min-max scaled to [0, 1] on its own, then
  averaged over the channels (and min-max scaled again). Every channel weighs the same,
  so structure that only one channel shows (e.g. a blue object on a green background,
  which luma weighs at 0.114 against 0.587) is as visible as the brightest channel's;
* ``'file'``: maps of your own from ``data.prototypes_file`` (`file_prototypes`), for data
  where a mean image means little (objects at varying positions, textures).

With one channel the first two are the same (up to rounding): the class mean image.
"""

import functools
import os

import jax
import numpy as np
from absl import logging

from bcam_jax import io_utils
from bcam_jax.data import PROTOTYPE_KINDS, PROTOTYPE_SOURCES, DataError, Datasets, Split
from bcam_jax.data.streaming import is_streamed, streamed_class_sums
from bcam_jax.report import figures

_MINMAX_EPS = 1e-8
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2, as Pillow's convert('L').
KINDS = PROTOTYPE_KINDS  # data.prototypes
SOURCES = PROTOTYPE_SOURCES  # data.prototypes_from


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


def _minmax(maps: np.ndarray) -> np.ndarray:
  """Each map of (..., H, W) scaled to [0, 1] over its H x W; a constant map becomes zeros."""
  low = maps.min(axis=(-2, -1), keepdims=True)
  high = maps.max(axis=(-2, -1), keepdims=True)
  return (maps - low) / np.maximum(high - low, _MINMAX_EPS)


def channel_average(images: np.ndarray) -> np.ndarray:
  """(..., H, W, C) -> (..., H, W): the mean over C of each channel min-max scaled on its own
  ('channels' in the module docstring)."""
  return _minmax(np.moveaxis(images, -1, -3)).mean(axis=-3)


def _to_maps(protos: np.ndarray, image_size: int) -> np.ndarray:
  """(K, h, w) float maps -> (K, image_size, image_size) float32, each min-max scaled.

  Resized with the bilinear `jax.image.resize` of `preprocess` before the scaling (resizing
  is linear, so a mean image resized equals the mean of the resized images).
  """
  num_classes = protos.shape[0]
  protos = protos.astype(np.float32)
  if protos.shape[1:] != (image_size, image_size):
    protos = np.asarray(
      jax.image.resize(protos, (num_classes, image_size, image_size), method='bilinear')
    )
  return _minmax(protos).astype(np.float32)


def _class_sums(split: Split, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(per-class sum of the uint8 pixels, int64 (num_classes, S, S, C); per-class count) of
  `split`: exact, so in memory, streamed (`streamed_class_sums`, one chunked pass) and
  pooled over splits give the same means."""
  if is_streamed(split):
    return streamed_class_sums(split, num_classes)
  images = split.images
  sums = np.zeros((num_classes,) + images.shape[1:], np.int64)
  counts = np.zeros(num_classes, np.int64)
  for c in range(num_classes):
    members = images[split.labels == c]
    counts[c] = len(members)
    sums[c] = members.sum(axis=0, dtype=np.int64)
  return sums, counts


def class_prototypes(
  split: Split | tuple[Split, ...], num_classes: int, image_size: int, kind: str = 'luma'
) -> np.ndarray:
  """Per-class mean image of `split` (or of several splits pooled: one mean over all their
  images, ``data.prototypes_from='pooled'``) at `image_size`, min-max scaled per class to
  [0, 1].

  The mean is taken at the split's size in float64 per channel, made one map by `kind`
  ('luma': `grayscale`; 'channels': `channel_average`), then resized (`_to_maps`). Returns
  (num_classes, image_size, image_size) float32; a constant image scales to zeros.
  """
  reduce = {'luma': grayscale, 'channels': channel_average}.get(kind)
  if reduce is None:
    raise ValueError(f"kind={kind!r}: class prototypes are 'luma' or 'channels'.")
  splits = split if isinstance(split, tuple) else (split,)
  sums, counts = _class_sums(splits[0], num_classes)
  for other in splits[1:]:
    more_sums, more_counts = _class_sums(other, num_classes)
    sums, counts = sums + more_sums, counts + more_counts
  empty = [c for c in range(num_classes) if counts[c] == 0]
  if empty:
    raise DataError(f'No examples of class(es) {empty} in the split: cannot build prototypes.')
  return _to_maps(reduce(sums / counts[:, None, None, None] / 255.0), image_size)


def file_prototypes(path: str, num_classes: int, image_size: int) -> np.ndarray:
  """Prototype maps of your own: `path` is a .npy of shape (num_classes, H, W), one map per
  class in the order of the class names, or (num_classes, C, H, W), whose channels become
  one map as 'channels' does (`channel_average`). Any real dtype and scale: the maps are
  resized to `image_size` and min-max scaled per class like the mean images.

  Returns (num_classes, image_size, image_size) float32; a DataError naming the file, the
  shape found and the shape expected when it does not fit.
  """
  expected = f'({num_classes}, H, W) or ({num_classes}, C, H, W) (num_classes first)'
  try:
    array = np.load(os.path.expanduser(path), allow_pickle=False)
  except (OSError, ValueError) as e:
    raise DataError(
      f'data.prototypes_file {path}: cannot be read as a .npy array ({type(e).__name__}: {e}); '
      f'expected an array of shape {expected}.'
    ) from e
  if array.ndim not in (3, 4) or array.shape[0] != num_classes or 0 in array.shape:
    raise DataError(
      f'data.prototypes_file {path}: shape {array.shape}; expected {expected}: one map per '
      f'class of the {num_classes} classes.'
    )
  if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
    raise DataError(f'data.prototypes_file {path}: dtype {array.dtype}; expected real numbers.')
  array = array.astype(np.float64)
  if not np.isfinite(array).all():
    raise DataError(
      f'data.prototypes_file {path}: {int((~np.isfinite(array)).sum())} values are NaN or '
      'infinite; expected finite numbers.'
    )
  if array.ndim == 4:
    array = channel_average(np.moveaxis(array, 1, -1))
  flat = array.reshape(num_classes, -1)
  constant = [c for c in range(num_classes) if flat[c].max() == flat[c].min()]
  if constant:
    logging.warning(
      'data.prototypes_file %s: the maps of class(es) %s are constant; min-max scaling makes '
      "them all zeros, so a CAM loss pulls those classes' explanations towards nothing.",
      path,
      ', '.join(map(str, constant)),
    )
  return _to_maps(array, image_size)


def load_or_compute_prototypes(
  workdir: str,
  datasets: Datasets,
  image_size: int,
  write: bool = True,
  kind: str = 'luma',
  prototypes_file: str = '',
  source: str = 'split',
) -> dict[str, np.ndarray]:
  """Class prototypes of the train and val splits, cached in `workdir` for resume.

  `kind` is data.prototypes ('luma', 'channels': `class_prototypes`; 'file':
  `file_prototypes` of `prototypes_file` for both). `source` is data.prototypes_from:
  'split' (each split's prototypes from its own images: the train loss compares with the
  train images' means, the validation loss with the validation images') or 'pooled' (one
  mean over the train and val images together, used by both, a reading of the Batch-CAM
  paper's section 3.4 "averaging all training and validation images").

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
      if kind == 'file':
        protos = file_prototypes(prototypes_file, info.num_classes, image_size)
      else:
        if source not in SOURCES:
          raise ValueError(f'source={source!r}; valid: {", ".join(SOURCES)}')
        if source == 'pooled' and 'train' in result:
          protos = result['train']  # one pooled set serves both splits: computed once
        else:
          pooled = source == 'pooled'
          split = (datasets.train, datasets.val) if pooled else getattr(datasets, split_name)
          protos = class_prototypes(split, info.num_classes, image_size, kind)
      if write:
        io_utils.atomic_write(npy, functools.partial(np.save, arr=protos))
        logging.info('Computed %s prototypes %s -> %s.', split_name, protos.shape, npy)
    if write and not os.path.exists(png):
      if kind == 'file':
        what = f'{split_name} prototypes: from {prototypes_file}'
      elif source == 'pooled':
        what = 'prototypes: mean image of each class, train and val pooled'
      else:
        what = f'{split_name} prototypes: mean image of each class'
      figures.save_image_grid(png, protos, titles, f'{info.name} {what}')
    result[split_name] = protos
  return result
