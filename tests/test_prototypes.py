"""Class prototypes against a per-class reference mean, and their workdir cache."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from bcam_jax import config_validation, data, prototypes
from bcam_jax.configs import base


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


def test_pooled_prototypes_are_the_mean_over_train_and_val(tmp_path):
  """data.prototypes_from='pooled': one mean per class over the train and val images
  together (not the mean of the two splits' means: the splits have different sizes), for
  both splits; against a per-class loop over the concatenated images."""
  train, val = _tiny_split(0, n=40), _tiny_split(1, n=20)
  info = data.DATASETS['mnist']
  datasets = data.Datasets(info=info, train=train, val=val, test=val, source='test')
  got = prototypes.load_or_compute_prototypes(str(tmp_path), datasets, 28, source='pooled')
  images = np.concatenate([train.images, val.images])[..., 0] / 255.0
  labels = np.concatenate([train.labels, val.labels])
  for c in range(9):
    mean = np.mean([images[i] for i in range(len(labels)) if labels[i] == c], axis=0)
    reference = (mean - mean.min()) / (mean.max() - mean.min())
    np.testing.assert_allclose(got['train'][c], reference, atol=1e-6)
  np.testing.assert_array_equal(got['val'], got['train'])
  split_means = prototypes.class_prototypes(train, 10, 28)
  assert np.abs(got['train'] - split_means).max() > 1e-3  # the val images count
  with Image.open(tmp_path / 'prototypes_train.png') as png:
    assert png.size[0] > 100
  with pytest.raises(ValueError, match="source='both'"):
    prototypes.load_or_compute_prototypes(str(tmp_path / 'new'), datasets, 28, source='both')
  config = base.get_base_config()
  config.data.prototypes_from = 'both'
  with pytest.raises(config_validation.ConfigError, match=r"config.data.prototypes_from='both'"):
    config_validation.validate_config(config)


def _minmax(maps):
  """Min-max scaling of each map by hand, for the references below."""
  out = []
  for m in maps:
    span = m.max() - m.min()
    out.append((m - m.min()) / span if span > 0 else np.zeros_like(m))
  return np.array(out)


def test_channels_prototypes_average_per_channel_scaled_means():
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (12, 6, 6, 3), np.uint8)
  images[..., 2] //= 8  # a dim channel: luma and 'channels' differ
  labels = (np.arange(12) % 2).astype(np.int32)
  protos = prototypes.class_prototypes(data.Split(images, labels), 2, 6, kind='channels')
  luma = prototypes.class_prototypes(data.Split(images, labels), 2, 6, kind='luma')
  for c in range(2):
    mean = images[labels == c].astype(np.float64).mean(0) / 255  # (6, 6, 3)
    per_channel = _minmax([mean[..., k] for k in range(3)])
    reference = _minmax([per_channel.mean(0)])[0]
    np.testing.assert_allclose(protos[c], reference, atol=1e-6)
    grey = mean @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(luma[c], _minmax([grey])[0], atol=1e-6)
  assert not np.allclose(protos, luma)
  # One channel: both kinds are the class mean image (up to float32 rounding).
  grey_split = data.Split(images[..., :1], labels)
  np.testing.assert_allclose(
    prototypes.class_prototypes(grey_split, 2, 6, kind='channels'),
    prototypes.class_prototypes(grey_split, 2, 6, kind='luma'),
    atol=1e-6,
  )


def test_file_prototypes_against_hand_computation(tmp_path):
  rng = np.random.default_rng(4)
  maps = rng.normal(size=(3, 8, 8))  # any scale: min-max scaled per class
  path = str(tmp_path / 'p.npy')
  np.save(path, maps)
  np.testing.assert_allclose(prototypes.file_prototypes(path, 3, 8), _minmax(maps), atol=1e-6)
  # Another size: resized bilinearly (jax.image.resize, as the images are) before scaling.
  resized = np.asarray(jax.image.resize(maps.astype(np.float32), (3, 12, 12), 'bilinear'))
  np.testing.assert_allclose(prototypes.file_prototypes(path, 3, 12), _minmax(resized), atol=1e-6)
  # (num_classes, C, H, W): each channel scaled, averaged, scaled again.
  four = rng.integers(0, 9, size=(3, 2, 8, 8)).astype(np.uint8)
  np.save(path, four)
  reference = [_minmax([_minmax(four[c].astype(np.float64)).mean(0)])[0] for c in range(3)]
  np.testing.assert_allclose(prototypes.file_prototypes(path, 3, 8), reference, atol=1e-6)


@pytest.mark.parametrize(
  'array, message',
  [
    (np.zeros((4, 8, 8)), r'shape \(4, 8, 8\); expected \(3, H, W\) or \(3, C, H, W\)'),
    (np.zeros((3, 8)), r'shape \(3, 8\); expected \(3, H, W\)'),
    (np.zeros((3, 1, 2, 8, 8)), r'shape \(3, 1, 2, 8, 8\); expected'),
    (np.full((3, 4, 4), np.nan), r'48 values are NaN or infinite'),
    (np.array([['a'] * 4] * 3, dtype='U1').reshape(3, 2, 2), r'dtype <U1; expected real'),
  ],
)
def test_file_prototypes_errors_name_the_file_and_shapes(tmp_path, array, message):
  path = str(tmp_path / 'bad.npy')
  np.save(path, array)
  with pytest.raises(data.DataError, match=rf'data.prototypes_file {path}: {message}'):
    prototypes.file_prototypes(path, 3, 8)


def test_file_prototypes_missing_or_unreadable(tmp_path):
  with pytest.raises(data.DataError, match=r'no.npy: cannot be read as a .npy array'):
    prototypes.file_prototypes(str(tmp_path / 'no.npy'), 3, 8)
  (tmp_path / 'text.npy').write_text('not an array')
  with pytest.raises(data.DataError, match=r'text.npy: cannot be read.*expected an array of'):
    prototypes.file_prototypes(str(tmp_path / 'text.npy'), 3, 8)


def test_load_or_compute_prototypes_from_a_file(tmp_path):
  info = data.DATASETS['fashion_mnist']
  datasets = data.Datasets(info, _tiny_split(0), _tiny_split(1), _tiny_split(2), 'test')
  maps = np.random.default_rng(5).random((10, 28, 28))
  path = str(tmp_path / 'mine.npy')
  np.save(path, maps)
  workdir = str(tmp_path / 'work')
  protos = prototypes.load_or_compute_prototypes(
    workdir, datasets, 28, kind='file', prototypes_file=path
  )
  for split in ('train', 'val'):
    np.testing.assert_allclose(protos[split], _minmax(maps), atol=1e-6)
    np.testing.assert_array_equal(
      np.load(os.path.join(workdir, f'prototypes_{split}.npy')), protos[split]
    )


def test_prototype_config_fields_are_checked(tmp_path):
  config = base.get_base_config()
  config_validation.validate_config(config)
  config.data.prototypes = 'median'
  with pytest.raises(config_validation.ConfigError, match=r"data.prototypes='median' is not"):
    config_validation.validate_config(config)
  config.data.prototypes = 'file'
  with pytest.raises(config_validation.ConfigError, match=r'needs config.data.prototypes_file'):
    config_validation.validate_config(config)
  config.data.prototypes_file = str(tmp_path / 'p.npy')
  np.save(config.data.prototypes_file, np.zeros((10, 4, 4)))
  config_validation.validate_config(config)
  config.data.prototypes = 'luma'
  with pytest.raises(config_validation.ConfigError, match=r'read only with config.data.prot'):
    config_validation.validate_config(config)


def test_prototype_kind_belongs_to_the_workdir(tmp_path):
  config = base.get_base_config()
  (tmp_path / 'config.json').write_text(config.to_json())
  config.data.prototypes = 'channels'
  with pytest.raises(
    config_validation.ConfigError, match=r"data.prototypes: 'luma' in the workdir, 'channels' now"
  ):
    config_validation.check_matches_workdir(config, str(tmp_path))
