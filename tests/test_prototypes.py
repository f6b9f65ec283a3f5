"""Class prototypes against a per-class reference mean, and their workdir cache."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from bcam_jax import data, prototypes


def _tiny_split(seed=0, n=40):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 28, 28, 1), np.uint8)
  labels = (np.arange(n) % 10).astype(np.int32)
  images[labels == 9] = 77  # a constant class: must give zeros, not NaN
  return data.Split(images, labels)


def test_class_prototypes_against_reference():
  split = _tiny_split()
  protos = prototypes.class_prototypes(split, 10, 28)
  assert protos.shape == (10, 28, 28) and protos.dtype == np.float32
  for c in range(9):
    mean = np.mean(
      [split.images[i, ..., 0] / 255.0 for i in range(len(split)) if split.labels[i] == c], axis=0
    )
    reference = (mean - mean.min()) / (mean.max() - mean.min())
    np.testing.assert_allclose(protos[c], reference, atol=1e-6)
    assert protos[c].min() == 0.0 and protos[c].max() == 1.0
  assert not protos[9].any()
  # At another size: the same as the mean of the resized images (resize is linear).
  big = prototypes.class_prototypes(split, 10, 56)
  resized = np.asarray(jax.image.resize(split.images[..., 0] / 255.0, (40, 56, 56), 'bilinear'))
  for c in range(9):
    mean = resized[split.labels == c].mean(axis=0)
    np.testing.assert_allclose(big[c], (mean - mean.min()) / (mean.max() - mean.min()), atol=1e-5)
  with pytest.raises(data.DataError, match=r'No examples of class\(es\) \[9\]'):
    prototypes.class_prototypes(data.Split(split.images[:9], split.labels[:9]), 10, 28)


def test_load_or_compute_prototypes_saves_and_reuses(tmp_path, monkeypatch):
  info = data.DATASETS['fashion_mnist']
  datasets = data.Datasets(
    info=info, train=_tiny_split(0), val=_tiny_split(1, n=20), test=_tiny_split(2), source='test'
  )
  workdir = str(tmp_path / 'work')
  first = prototypes.load_or_compute_prototypes(workdir, datasets, 56)
  assert sorted(os.listdir(workdir)) == [
    'prototypes_train.npy',
    'prototypes_train.png',
    'prototypes_val.npy',
    'prototypes_val.png',
  ]
  assert first['train'].shape == first['val'].shape == (10, 56, 56)
  assert not np.array_equal(first['train'], first['val'])
  np.testing.assert_array_equal(np.load(os.path.join(workdir, 'prototypes_val.npy')), first['val'])
  with Image.open(os.path.join(workdir, 'prototypes_train.png')) as png:
    assert png.format == 'PNG' and png.size[0] > png.size[1] > 100
  mtimes = {f: os.stat(os.path.join(workdir, f)).st_mtime_ns for f in os.listdir(workdir)}

  def must_not_run(*args):
    raise AssertionError('prototypes recomputed')

  monkeypatch.setattr(prototypes, 'class_prototypes', must_not_run)
  second = prototypes.load_or_compute_prototypes(workdir, datasets, 56)
  for key in ('train', 'val'):
    np.testing.assert_array_equal(second[key], first[key])
  assert mtimes == {f: os.stat(os.path.join(workdir, f)).st_mtime_ns for f in os.listdir(workdir)}
  with pytest.raises(data.DataError, match=r'shape \(10, 56, 56\), expected \(10, 112, 112\)'):
    prototypes.load_or_compute_prototypes(workdir, datasets, 112)
