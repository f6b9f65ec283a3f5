"""Batches: the training order is a pure function of ``(seed, step)``, so a resumed run sees
exactly the batches an uninterrupted run would; evaluation batches are padded to one shape
with a mask, so masked sums count each example once."""

import collections.abc
import functools

import numpy as np

from bcam_jax.data.dataset import DataError, Split


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
