"""A TFDS image-classification dataset by name (`data.source='tfds'`, `open_tfds`), without
network access or TensorFlow.

How the data is faked: `tfds.testing.mock_data` serves random records for
`tfds.data_source`, but under its USE_CODE policy a dataset has no splits (any split name is
accepted) and reports itself unprepared. So each test first writes the dataset's real
metadata (features.json, dataset_info.json with the splits we choose) into a temporary
data_dir, as a prepared copy would have it; `mock_data(data_dir=...)` then reads those files
(splits, class names, "prepared") and mocks only the ArrayRecord records. Writing the
metadata needs no TensorFlow; writing real ArrayRecord records would (TFDS encodes images
with TensorFlow), hence the mock. The dataset is cats_vs_dogs: RGB images of varying size
(shape (None, None, 3)), which exercises the resize + centre crop, and 2 classes, which
random labels cover with a few records. The mocked records do not depend on the split.
"""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import splits as splits_lib

from bcam_jax import config_validation, data, run_setup, train_lib
from bcam_jax.configs import tfds_rgb
from bcam_jax.data import records, stats_cache, tfds_source
from bcam_jax.run_spec import RunSpec

NAME = 'cats_vs_dogs'
NUM = 24  # records per split served by the mock


def write_metadata(data_dir, split_names) -> str:
  """Writes cats_vs_dogs' metadata with `split_names` into `data_dir` (a prepared copy
  without records); returns data_dir."""
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE):
    builder = tfds.builder(NAME)
    info = builder.info
    info.set_splits(
      splits_lib.SplitDict(
        [
          splits_lib.SplitInfo(name=s, shard_lengths=[NUM], num_bytes=0, filename_template=None)
          for s in split_names
        ]
      )
    )
    out = os.path.join(str(data_dir), NAME, str(builder.version))
    os.makedirs(out)
    info.write_to_directory(out)
  return str(data_dir)


@pytest.fixture
def mocked(tmp_path):
  """A cats_vs_dogs with train and validation splits (no test), mocked; yields data_dir."""
  data_dir = write_metadata(tmp_path / 'tfds', ['train', 'validation'])
  with tfds.testing.mock_data(num_examples=NUM, data_dir=data_dir):
    yield data_dir


def raw_records(data_dir, split='train'):
  """The mocked records as TFDS serves them: (image (H, W, 3) uint8, label)."""
  source = tfds.data_source(NAME, split=split, data_dir=data_dir, download=False)
  return [(np.asarray(source[i]['image']), int(source[i]['label'])) for i in range(len(source))]


def by_hand(image: np.ndarray, size: int, grey: bool = False) -> np.ndarray:
  """torchvision's Resize(size) + CenterCrop(size), written out with Pillow calls."""
  pil = Image.fromarray(image)
  if grey:
    pil = pil.convert('L')
  w, h = pil.size
  nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
  pil = pil.resize((nw, nh), Image.Resampling.BILINEAR)
  left, top = int(round((nw - size) / 2)), int(round((nh - size) / 2))
  out = np.asarray(pil.crop((left, top, left + size, top + size)))
  return out[..., None] if grey else out


def tfds_config(data_dir, **fields):
  """configs/tfds_rgb.py on cats_vs_dogs at 16 px, simple_cnn, a few steps."""
  config = tfds_rgb.get_config()
  config.data.name = NAME
  config.data.tfds_data_dir = data_dir
  config.data.image_size = 16
  config.data.val_size = 6
  config.model.name = 'simple_cnn'
  config.model.options = {}
  config.train.batch_size = 8
  config.train.num_steps = 2
  config.train.num_epochs = 0
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 2
  config.train.eval_every_steps = 2
  config.optimizer.warmup_steps = 1
  config.eval.batch_size = 8
  for key, value in fields.items():
    config.data[key] = value
  return config


def test_open_tfds_reads_names_channels_splits_and_resizes(mocked):
  ds = tfds_source.open_tfds(NAME, mocked, image_size=12)
  assert ds.class_names == ('cat', 'dog') and ds.channels == 3 and ds.num_classes == 2
  # No 'test' split: 'validation' is tested on, and no validation split is named.
  assert ds.split_names == {'train': 'train', 'test': 'validation'}
  assert set(ds.splits) == {'train', 'test'} and len(ds.splits['train']) == NUM
  raw = raw_records(mocked)
  assert len({image.shape for image, _ in raw}) > 1  # sizes vary: resizing is exercised
  for i in (0, 5, NUM - 1):
    image, label = ds.splits['train'][i]
    assert image.shape == (12, 12, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, by_hand(raw[i][0], 12))
    assert label == raw[i][1]


def test_channels_override_gives_luma(mocked):
  ds = tfds_source.open_tfds(NAME, mocked, image_size=10, channels=1)
  image, _ = ds.splits['train'][3]
  np.testing.assert_array_equal(image, by_hand(raw_records(mocked)[3][0], 10, grey=True))


def test_load_datasets_by_name_with_statistics(mocked, tmp_path):
  config = tfds_config(mocked)
  ds = data.load_datasets(data.DataSpec.from_config(config.data), str(tmp_path / 'work'))
  assert ds.info.name == NAME and ds.info.class_names == ('cat', 'dog')
  assert ds.info.channels == 3 and ds.info.num_classes == 2
  # Validation: data.val_size of train (seeded); test: the 'validation' split.
  assert (len(ds.train), len(ds.val), len(ds.test)) == (NUM - 6, 6, NUM)
  assert ds.test.images.shape == (NUM, 16, 16, 3)
  raw = raw_records(mocked)
  full_train = np.stack([by_hand(image, 16) for image, _ in raw])
  labels = np.array([label for _, label in raw])
  train, val = data.split_train_val(data.Split(full_train, labels), 6, config.data.split_seed)
  np.testing.assert_array_equal(ds.train.images, train.images)
  np.testing.assert_array_equal(ds.val.labels, val.labels)
  # Per-channel mean / std of the whole official train split, by hand, in [0, 1] units.
  pixels = full_train.reshape(-1, 3).astype(np.float64) / 255
  np.testing.assert_allclose(ds.info.mean, pixels.mean(0), rtol=1e-12)
  np.testing.assert_allclose(ds.info.std, pixels.std(0), rtol=1e-12)
  cached = json.loads((tmp_path / 'work' / stats_cache.STATS_FILE).read_text())
  assert cached['key']['source'] == 'tfds' and cached['key']['image_size'] == 16
  assert ds.source.startswith(f'TFDS {NAME} (prepared) in ')


def test_streamed_tfds_dataset_gives_the_in_memory_batches(mocked, tmp_path):
  """data.stream='stream' (or 'auto' over in_memory_limit_mb) reads the TFDS splits on
  demand: the same examples, statistics, training and eval batches as in memory."""
  memory = data.load_datasets(
    data.DataSpec.from_config(tfds_config(mocked, stream='memory').data), str(tmp_path / 'm')
  )
  config = tfds_config(mocked, stream='auto', in_memory_limit_mb=0.001)
  config_validation.validate_config(config)
  streamed = data.load_datasets(data.DataSpec.from_config(config.data), str(tmp_path / 's'))
  assert all(data.is_streamed(s) for s in (streamed.train, streamed.val, streamed.test))
  assert not data.is_streamed(memory.train)
  assert streamed.info == memory.info
  for name in ('train', 'val', 'test'):
    a, b = getattr(streamed, name), getattr(memory, name)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.images[np.arange(len(b))], b.images)
  for step in range(3):
    idx = data.train_batch_indices(len(memory.train), 8, 0, step)
    np.testing.assert_array_equal(streamed.train.images[idx], memory.train.images[idx])


def test_validation_split_is_used_when_there_is_a_test_split(tmp_path):
  data_dir = write_metadata(tmp_path / 'tfds', ['train', 'validation', 'test'])
  with tfds.testing.mock_data(num_examples=NUM, data_dir=data_dir):
    ds = data.load_datasets(data.DataSpec.from_config(tfds_config(data_dir).data))
  assert (len(ds.train), len(ds.val), len(ds.test)) == (NUM, NUM, NUM)


def test_record_source_interface_and_materialize(mocked):
  source = tfds_source.open_tfds(NAME, mocked, image_size=8).splits['train']
  split = records.materialize(source, 'train', workers=2)
  assert split.images.shape == (NUM, 8, 8, 3) and split.labels.dtype == np.int32
  for i in range(NUM):
    image, label = source[i]
    np.testing.assert_array_equal(split.images[i], image)
    assert split.labels[i] == label


def test_unprepared_without_tensorflow_says_what_to_run(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, '_tensorflow_missing', lambda: True)
  data_dir = str(tmp_path / 'empty')
  with pytest.raises(data.DataError) as error:
    tfds_source.open_tfds(NAME, data_dir, image_size=16)
  message = str(error.value)
  assert f"TFDS dataset '{NAME}' is not prepared in {data_dir}" in message
  assert 'pip install "bcam-jax[tfds-prepare]"' in message
  assert f"tfds.builder('{NAME}', data_dir='{data_dir}').download_and_prepare" in message


def test_unknown_dataset_and_missing_splits(tmp_path):
  with pytest.raises(data.DataError, match=r"tfds.builder\('no_such_dataset_xyz'\) failed"):
    tfds_source.open_tfds('no_such_dataset_xyz', str(tmp_path), image_size=16)
  data_dir = write_metadata(tmp_path / 'tfds', ['train'])
  with tfds.testing.mock_data(num_examples=NUM, data_dir=data_dir):
    with pytest.raises(data.DataError, match=r"neither a 'test' nor a 'validation' split"):
      tfds_source.open_tfds(NAME, data_dir, image_size=16)


def test_config_fields_for_tfds_by_name(mocked):
  config = tfds_config(mocked)
  config_validation.validate_config(config)
  config.data.channels = 2
  with pytest.raises(config_validation.ConfigError, match=r'data.channels=2 is not valid'):
    config_validation.validate_config(config)
  config.data.channels, config.data.name = 0, ''
  with pytest.raises(config_validation.ConfigError, match=r'expected a TFDS dataset name'):
    config_validation.validate_config(config)


def test_train_on_a_tfds_rgb_dataset(mocked, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  result = train_lib.train_and_evaluate(tfds_config(mocked), workdir)
  assert result['step'] == 2 and np.isfinite(result['test_loss'])
  assert result['state'].params['backbone_net']['conv1']['kernel'].shape[2] == 3
  assert np.load(os.path.join(workdir, 'prototypes_train.npy')).shape == (2, 16, 16)
  assert os.path.exists(os.path.join(workdir, stats_cache.STATS_FILE))
  # Evaluation (and a resumed run) reads the train mean / std from the workdir.
  stats = json.loads((tmp_path / 'run' / stats_cache.STATS_FILE).read_text())

  def must_not_run(*args, **kwargs):
    raise AssertionError('statistics recomputed')

  monkeypatch.setattr(stats_cache, 'channel_stats', must_not_run)
  run = run_setup.setup_run(RunSpec.from_config(tfds_config(mocked)), workdir=workdir)
  assert run.datasets.info.mean == tuple(stats['mean'])


def test_records_check_each_record():
  """TfdsRecords over a plain list of TFDS-style records: conversions and the errors."""
  grey = np.arange(36, dtype=np.uint8).reshape(6, 6)
  source = [
    {'image': grey, 'label': 1},
    {'image': grey.astype(np.float32), 'label': 0},
    {'image': grey[..., None], 'label': 7},
    {'image': np.zeros((6, 6, 2), np.uint8), 'label': 0},
  ]
  recs = tfds_source.TfdsRecords(source, 'fake/train', image_size=6, channels=3, num_classes=2)
  image, label = recs[0]
  assert label == 1 and image.shape == (6, 6, 3)
  for c in range(3):  # grey -> RGB: three equal channels
    np.testing.assert_array_equal(image[..., c], grey)
  with pytest.raises(data.DataError, match=r'fake/train: record 1: expected a uint8'):
    recs[1]
  with pytest.raises(data.DataError, match=r'fake/train: record 2: label 7 outside \[0, 2\)'):
    recs[2]
  with pytest.raises(data.DataError, match=r'record 3: an image of 2 channels'):
    recs[3]
  mixed = [(np.zeros((4, 4, 3), np.uint8), 0), (np.zeros((5, 5, 3), np.uint8), 1)]
  with pytest.raises(data.DataError, match=r'mixed: record 1 is a uint8 \(5, 5, 3\) image'):
    records.materialize(mixed, 'mixed', workers=1)
