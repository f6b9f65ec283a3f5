"""An image folder as a training source: `load_datasets` with data.source='folder', its config
checks, RGB normalisation and prototypes, and train + evaluate end to end on an RGB folder."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from bcam_jax import config_validation, data, eval_lib, eval_options, prototypes, train_lib
from bcam_jax.configs import image_folder
from tests import synthetic


def folder_config(root, **data_fields):
  """configs/image_folder.py at 12 px with simple_cnn and a small batch, on `root`."""
  config = image_folder.get_config()
  config.model.name = 'simple_cnn'
  config.model.options = {}
  config.data.folder_dir = str(root)
  config.data.name = 'shapes'
  config.data.image_size = 12
  config.data.val_size = 6
  config.train.batch_size = 16
  config.train.num_steps = 6
  config.train.log_every_steps = 3
  config.train.checkpoint_every_steps = 3
  config.optimizer.learning_rate = 0.05
  config.optimizer.warmup_steps = 2
  config.eval.batch_size = 9
  for key, value in data_fields.items():
    config.data[key] = value
  return config


@pytest.fixture(scope='module')
def rgb_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('shapes'))
  return synthetic.write_folder(root, {'train': 8, 'val': 3, 'test': 4})


def test_load_datasets_reads_the_folder(rgb_root):
  ds = data.load_datasets(data.DataSpec.from_config(folder_config(rgb_root).data))
  info = ds.info
  assert info.name == 'shapes' and info.class_names == synthetic.FOLDER_CLASSES
  assert info.num_classes == 3 and info.channels == 3
  assert (len(ds.train), len(ds.val), len(ds.test)) == (24, 9, 12)
  assert ds.train.images.shape == (24, 12, 12, 3) and ds.val.images.shape == (9, 12, 12, 3)
  np.testing.assert_array_equal(ds.val.labels, np.repeat(np.arange(3, dtype=np.int32), 3))
  # Per-channel statistics of the train split in [0, 1] units, by hand.
  pixels = ds.train.images.reshape(-1, 3).astype(np.float64) / 255
  np.testing.assert_allclose(info.mean, pixels.mean(0), rtol=1e-12)
  np.testing.assert_allclose(info.std, pixels.std(0), rtol=1e-12)
  assert ds.source == f'image folder {rgb_root}'


def test_without_val_folder_train_is_split(tmp_path):
  root = synthetic.write_folder(str(tmp_path), {'train': 5, 'test': 2})
  ds = data.load_datasets(data.DataSpec.from_config(folder_config(root, val_size=4).data))
  assert (len(ds.train), len(ds.val), len(ds.test)) == (11, 4, 6)
  with pytest.raises(data.DataError, match=r'no val split, so data.val_size=15 of its 15 train'):
    data.load_datasets(data.DataSpec.from_config(folder_config(root, val_size=15).data))


def test_resize_and_channels_come_from_the_config(rgb_root):
  ds = data.load_datasets(
    data.DataSpec.from_config(folder_config(rgb_root, image_size=8, channels=1).data)
  )
  assert ds.train.images.shape == (24, 8, 8, 1) and ds.info.channels == 1
  assert len(ds.info.mean) == len(ds.info.std) == 1


def test_normalize_is_per_channel():
  pixels = jnp.asarray(np.random.default_rng(0).random((2, 4, 4, 3)), jnp.float32)
  mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
  want = (np.asarray(pixels) - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(data.normalize(pixels, mean, std), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(data.normalize(pixels, (0.5,), (0.25,)), (pixels - 0.5) / 0.25)
  with pytest.raises(ValueError, match=r'mean=\(0.1, 0.2\) has 2 values for images of 3'):
    data.normalize(pixels, (0.1, 0.2), 1.0)


def test_rgb_prototype_is_the_luma_of_the_class_mean():
  images = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), np.uint8)
  split = data.Split(images, np.array([0, 0, 1, 1, 2, 2], np.int32))
  protos = prototypes.class_prototypes(split, 3, 4)
  for c in range(3):
    mean = images[2 * c : 2 * c + 2].mean(0) / 255
    luma = mean @ np.array([0.299, 0.587, 0.114])
    want = (luma - luma.min()) / (luma.max() - luma.min())
    np.testing.assert_allclose(protos[c], want, atol=1e-6)


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'folder_dir': ''}, r"source='folder' needs config.data.folder_dir=<root>.*empty"),
    ({'folder_dir': '/no/such/dir'}, r"folder_dir='/no/such/dir' is not a directory"),
    ({'name': 'mnist'}, r"config.data.name='mnist' with config.data.source='folder'"),
    ({'channels': 2}, r'config.data.channels=2 is not valid; choose one of \(0, 1, 3\)'),
    ({'source': 'idx'}, r"folder_dir=.* is read only with config.data.source='folder'"),
  ],
)
def test_folder_fields_are_checked(rgb_root, fields, message):
  config = folder_config(rgb_root)
  if fields.get('source') == 'idx':
    config.data.name = 'mnist'
  for key, value in fields.items():
    config.data[key] = value
  with pytest.raises(config_validation.ConfigError, match=message):
    config_validation.validate_config(config)


@pytest.mark.parametrize('head', ['default', 'softcam'])
def test_train_and_evaluate_bcpl_on_an_rgb_folder(rgb_root, tmp_path, head):
  workdir = str(tmp_path / 'run')
  config = folder_config(rgb_root)
  config.model.head = head
  result = train_lib.train_and_evaluate(config, workdir)
  assert result['step'] == 6 and np.isfinite(result['test_loss'])
  first_conv = result['state'].params['backbone_net']['conv1']['kernel']
  assert first_conv.shape[2] == 3  # built for RGB input
  assert np.load(os.path.join(workdir, 'prototypes_train.npy')).shape == (3, 12, 12)

  methods = ('grad_cam', 'evidence') if head == 'softcam' else ('grad_cam',)
  sanity = 2 if head == 'default' else 0  # the randomisation test re-initialises RGB layers
  options = eval_options.EvalOptions(methods=methods, num_overlays=3, sanity_images=sanity)
  report = eval_lib.evaluate_and_report(config, workdir, options=options)
  assert report['test_count'] == 12
  for method in methods:
    assert np.isfinite(report['methods'][method]['image_l1']), method
  assert ('sanity' in report) == bool(sanity)
  for name in ('confusion.png', 'cam_prototypes.png', 'overlays.png', 'report.md'):
    assert os.path.getsize(os.path.join(workdir, 'eval', name)) > 0, name


def test_channels_belong_to_the_workdir(rgb_root, tmp_path):
  config = folder_config(rgb_root)
  (tmp_path / 'config.json').write_text(config.to_json())
  config_validation.check_matches_workdir(config, str(tmp_path))
  config.data.channels = 1
  with pytest.raises(
    config_validation.ConfigError, match=r'data.channels: 0 in the workdir, 1 now'
  ):
    config_validation.check_matches_workdir(config, str(tmp_path))


def test_a_workdir_written_before_the_folder_fields_still_matches(tmp_path):
  config = image_folder.get_config()
  config.data.source, config.data.name = 'auto', 'mnist'
  recorded = json.loads(config.to_json())
  for field in ('channels', 'folder_dir'):
    del recorded['data'][field]
  (tmp_path / 'config.json').write_text(json.dumps(recorded))
  config_validation.check_matches_workdir(config, str(tmp_path))
