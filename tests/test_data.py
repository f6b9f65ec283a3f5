"""Tests of bcam_jax.data on tiny synthetic IDX files and mocked TFDS (never real data)."""

import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bcam_jax import data
from bcam_jax.data import batching, download
from tests.synthetic import idx_bytes

N_TRAIN, N_TEST = 30, 10
MNIST = data.DATASETS['mnist']


def write_file(path, raw, gz=False):
  with open(path, 'wb') as f:
    f.write(gzip.compress(raw) if gz else raw)


def make_idx_dir(directory, gz=False, seed=0):
  """Writes four tiny valid IDX files; returns their (train, test) contents as Splits."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  splits = []
  for part, n in (('train', N_TRAIN), ('t10k', N_TEST)):
    images = rng.integers(0, 256, (n, 28, 28), np.uint8)
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    suffix = '.gz' if gz else ''
    write_file(os.path.join(directory, f'{part}-images-idx3-ubyte{suffix}'), idx_bytes(images), gz)
    write_file(os.path.join(directory, f'{part}-labels-idx1-ubyte{suffix}'), idx_bytes(labels), gz)
    splits.append(data.Split(images[..., None], labels.astype(np.int32)))
  return splits[0], splits[1]


def config(**overrides):
  fields = dict(name='mnist', source='auto', idx_dir='', tfds_data_dir='', val_size=6, split_seed=0)
  fields.update(overrides)
  return data.DataSpec(**fields)


@pytest.fixture
def no_tfds_download(monkeypatch):
  """Makes any TFDS download_and_prepare fail at once, as without network."""

  def fail(self, *args, **kwargs):
    raise ConnectionError('no network (test)')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', fail)


def assert_split_equal(a, b):
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)


# ---------------------------------------------------------------------------- IDX


@pytest.mark.parametrize('gz', [False, True])
def test_idx_round_trip(tmp_path, gz):
  train, test = make_idx_dir(tmp_path, gz=gz)
  got_train, got_test = data.load_idx(str(tmp_path), MNIST)
  assert got_train.images.shape == (N_TRAIN, 28, 28, 1)
  assert got_train.images.dtype == np.uint8 and got_train.labels.dtype == np.int32
  assert len(got_test) == N_TEST
  assert_split_equal(got_train, train)
  assert_split_equal(got_test, test)


def _corrupt(directory, name, raw=None, gz=False):
  """Replaces one file of a valid IDX directory with `raw` bytes."""
  for stale in (name, name + '.gz'):
    if os.path.exists(os.path.join(directory, stale)):
      os.remove(os.path.join(directory, stale))
  if raw is not None:
    path = os.path.join(directory, name + ('.gz' if gz else ''))
    with open(path, 'wb') as f:
      f.write(raw)


_RNG = np.random.default_rng(1)
_IMAGES = _RNG.integers(0, 256, (N_TRAIN, 28, 28), np.uint8)
_LABELS = (np.arange(N_TRAIN) % 10).astype(np.uint8)


@pytest.mark.parametrize(
  'name, raw, gz, expected',
  [
    (
      'train-images-idx3-ubyte',
      idx_bytes(_IMAGES, magic=0x0801),
      False,
      ['wrong magic', '0x00000803', '0x00000801'],
    ),
    (
      'train-images-idx3-ubyte',
      idx_bytes(_IMAGES[:, :27]),
      False,
      ['wrong image size', '28x28', '27x28'],
    ),
    (
      'train-images-idx3-ubyte',
      idx_bytes(_IMAGES)[:-5],
      False,
      ['truncated data', '23520 bytes', 'found 23515'],
    ),
    ('train-images-idx3-ubyte', idx_bytes(_IMAGES) + b'xx', False, ['excess data']),
    ('train-images-idx3-ubyte', idx_bytes(_IMAGES)[:10], False, ['truncated IDX images header']),
    (
      'train-labels-idx1-ubyte',
      idx_bytes(_LABELS[:-1]),
      False,
      ['Count mismatch', '30 images', '29 labels', 'train-images-idx3-ubyte'],
    ),
    (
      'train-labels-idx1-ubyte',
      idx_bytes(np.where(_LABELS == 3, 10, _LABELS)),
      False,
      ['label out of range', '[0, 10)', 'found 10'],
    ),
    (
      'train-labels-idx1-ubyte',
      gzip.compress(idx_bytes(_LABELS), mtime=0)[:-12],
      True,
      ['corrupt gzip'],
    ),
    ('train-labels-idx1-ubyte', b'not a gzip stream at all', True, ['corrupt gzip']),
    (
      'train-labels-idx1-ubyte',
      gzip.compress(idx_bytes(_LABELS), mtime=0),
      False,
      ['wrong magic', 'gzip-compressed'],
    ),
  ],
)
def test_idx_corrupt_file_names_file_and_problem(tmp_path, name, raw, gz, expected):
  make_idx_dir(tmp_path)
  _corrupt(tmp_path, name, raw, gz)
  with pytest.raises(data.DataError) as err:
    data.load_idx(str(tmp_path), MNIST)
  message = str(err.value)
  assert os.path.join(str(tmp_path), name) in message
  for part in expected:
    assert part in message


def test_idx_missing_files_lists_names_and_directory(tmp_path):
  make_idx_dir(tmp_path, gz=True)
  _corrupt(tmp_path, 't10k-labels-idx1-ubyte')
  with pytest.raises(data.DataError, match='Missing IDX files') as err:
    data.load_idx(str(tmp_path), MNIST)
  message = str(err.value)
  assert str(tmp_path) in message
  assert 't10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz' in message
  assert 'train-images' not in message
  with pytest.raises(data.DataError, match='does not exist'):
    data.load_idx(str(tmp_path / 'nowhere'), MNIST)


# ---------------------------------------------------------------------------- TFDS and sources


@pytest.mark.parametrize('name', ['mnist', 'fashion_mnist'])
def test_tfds_mock_shapes_and_counts(tmp_path, name):
  with tfds.testing.mock_data(num_examples=12):
    train, test = data.load_tfds(name, data_dir=str(tmp_path))
    datasets = data.load_datasets(
      config(name=name, source='tfds', tfds_data_dir=str(tmp_path), val_size=4)
    )
  for split in (train, test):
    assert split.images.shape == (12, 28, 28, 1) and split.images.dtype == np.uint8
    assert split.labels.shape == (12,) and split.labels.dtype == np.int32
    assert split.labels.min() >= 0 and split.labels.max() < 10
  assert (len(datasets.train), len(datasets.val), len(datasets.test)) == (8, 4, 12)
  assert datasets.info.name == name and 'TFDS' in datasets.source


def test_tfds_unprepared_and_preparation_fails(tmp_path, no_tfds_download):
  with pytest.raises(data.DataError) as err:
    data.load_datasets(config(source='tfds', tfds_data_dir=str(tmp_path)))
  message = str(err.value)
  for part in (
    'no prepared copy',
    str(tmp_path),
    "download_and_prepare(file_format='array_record')",
    'ConnectionError: no network (test)',
    'data.source=idx',
    'BCAM_DATA_DIR',
    'install tensorflow',
    'data.source=download',
  ):
    assert part in message


def test_auto_loads_idx_when_tfds_not_prepared(tmp_path, monkeypatch, no_tfds_download):
  train, test = make_idx_dir(tmp_path / 'root' / 'mnist', gz=True)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / 'root'))
  datasets = data.load_datasets(config(tfds_data_dir=str(tmp_path / 'tfds')))
  assert datasets.source == f'IDX files in {tmp_path / "root" / "mnist"}'
  assert_split_equal(datasets.test, test)
  assert len(datasets.train) + len(datasets.val) == N_TRAIN
  # An explicit idx_dir wins over the environment variable.
  other_train, _ = make_idx_dir(tmp_path / 'other', seed=5)
  datasets = data.load_datasets(config(source='idx', idx_dir=str(tmp_path / 'other')))
  assert sorted(np.concatenate([datasets.train.labels, datasets.val.labels]).tolist()) == sorted(
    other_train.labels.tolist()
  )
  assert str(tmp_path / 'other') in datasets.source


def test_auto_prefers_prepared_tfds(tmp_path, monkeypatch, no_tfds_download):
  make_idx_dir(tmp_path / 'root' / 'mnist')
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / 'root'))
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  with tfds.testing.mock_data(num_examples=16):
    datasets = data.load_datasets(config(tfds_data_dir=str(tmp_path / 'tfds')))
  assert datasets.source.startswith('TFDS mnist (prepared)')
  assert len(datasets.train) + len(datasets.val) == 16


@pytest.fixture
def no_network(monkeypatch):
  """Makes every IDX download fail at once, as without network."""

  def fail(*args, **kwargs):
    raise OSError('no network (test)')

  monkeypatch.setattr(download.urllib.request, 'urlopen', fail)
  monkeypatch.delenv(download.MIRROR_ENV, raising=False)


def test_auto_all_sources_fail_lists_every_attempt(
  tmp_path, monkeypatch, no_tfds_download, no_network
):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  with pytest.raises(data.DataError) as err:
    data.load_datasets(config(tfds_data_dir=str(tmp_path)))
  message = str(err.value)
  cache = tmp_path / 'cache' / 'bcam_jax' / 'mnist'
  for part in (
    "Could not load dataset 'mnist' (data.source=auto). Tried, in order:\n",
    '\n  - prepared TFDS: ',
    'is not prepared in',
    f'\n  - IDX files: Missing IDX files in {cache} (the directory does not exist)',
    f'\n  - download: Could not download mnist/train-images-idx3-ubyte.gz into {cache}',
    *(
      f'\n    - {mirror}train-images-idx3-ubyte.gz: OSError: no network (test)\n'
      for mirror in download.MIRRORS['mnist']
    ),
    '\n  - TFDS download: ',
    'ConnectionError: no network (test)',
    '\nTo fix: where there is network access run `bcam-data download --dataset=mnist --dest=DIR`',
  ):
    assert part in message
  # With a directory that lacks the files, the IDX attempt says which files were missing.
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / 'empty'))
  with pytest.raises(data.DataError, match=r'IDX files: Missing IDX files in .*empty.mnist'):
    data.load_datasets(config(tfds_data_dir=str(tmp_path)))
  # data.source=idx reads only data.idx_dir or $BCAM_DATA_DIR.
  monkeypatch.delenv(data.DATA_DIR_ENV)
  with pytest.raises(data.DataError, match=r'^No IDX directory: data.idx_dir is empty and \$BCAM'):
    data.load_datasets(config(source='idx'))
  # data.source=download adds the fix to the download's error.
  with pytest.raises(data.DataError, match=r'(?s)^Could not download mnist/.*\nTo fix: '):
    data.load_datasets(config(source='download'))


def test_bad_names():
  with pytest.raises(data.DataError, match='fashion_mnist, mnist'):
    data.dataset_info('cifar10')
  with pytest.raises(data.DataError, match='auto, tfds, idx, download'):
    data.load_datasets(config(source='http'))


# ---------------------------------------------------------------------------- splits and batches


def _id_split(n):
  """A split whose label is the example id, and whose pixels repeat it (mod 256)."""
  ids = np.arange(n, dtype=np.int32)
  images = np.broadcast_to((ids % 256).astype(np.uint8)[:, None, None, None], (n, 28, 28, 1))
  return data.Split(np.ascontiguousarray(images), ids)


def test_split_train_val():
  full = _id_split(50)
  train, val = data.split_train_val(full, 12, seed=3)
  assert (len(train), len(val)) == (38, 12)
  assert not set(train.labels.tolist()) & set(val.labels.tolist())
  assert sorted(train.labels.tolist() + val.labels.tolist()) == list(range(50))
  np.testing.assert_array_equal(train.images[:, 0, 0, 0], train.labels % 256)
  again_train, again_val = data.split_train_val(full, 12, seed=3)
  assert_split_equal(again_train, train)
  assert_split_equal(again_val, val)
  _, other_val = data.split_train_val(full, 12, seed=4)
  assert set(other_val.labels.tolist()) != set(val.labels.tolist())
  for bad in (0, -1, 50, 51, 2.5, True):
    with pytest.raises(data.DataError, match=r'val_size must be an integer in \[1, 50\)'):
      data.split_train_val(full, bad, seed=3)


def test_train_batch_indices():
  n, bs, seed = 20, 5, 7
  assert data.steps_per_epoch(n, bs) == 4 and data.steps_per_epoch(23, 5) == 4
  epochs = []
  for epoch in range(3):
    batches = [data.train_batch_indices(n, bs, seed, epoch * 4 + s) for s in range(4)]
    for b in batches:
      assert b.dtype == np.int64 and b.shape == (bs,)
    order = np.concatenate(batches)
    assert sorted(order.tolist()) == list(range(n))
    np.testing.assert_array_equal(order, np.random.default_rng([seed, epoch]).permutation(n))
    epochs.append(order)
  assert not np.array_equal(epochs[0], epochs[1])
  # Pure: same arguments, same result, even after the cache is dropped or results mutated.
  first = data.train_batch_indices(n, bs, seed, 9)
  first[:] = -1
  batching._epoch_order.cache_clear()
  np.testing.assert_array_equal(data.train_batch_indices(n, bs, seed, 9), epochs[2][5:10])
  assert not np.array_equal(data.train_batch_indices(n, bs, seed + 1, 9), epochs[2][5:10])
  # Remainder dropped: no index twice within an epoch.
  seen = np.concatenate([data.train_batch_indices(23, 5, seed, s) for s in range(4)])
  assert len(set(seen.tolist())) == 20
  with pytest.raises(data.DataError, match='batch_size'):
    data.train_batch_indices(4, 5, seed, 0)


def test_eval_batches_pad_and_mask():
  split = _id_split(23)
  batches = list(data.eval_batches(split, 5))
  assert len(batches) == 5
  for images, labels, mask in batches:
    assert images.shape == (5, 28, 28, 1) and labels.shape == (5,) and mask.shape == (5,)
  masks = np.concatenate([m for _, _, m in batches])
  assert masks.sum() == 23 and masks.dtype == bool
  np.testing.assert_array_equal(np.concatenate([b[1] for b in batches])[masks], split.labels)
  np.testing.assert_array_equal(np.concatenate([b[0] for b in batches])[masks], split.images)
  last_images, last_labels, last_mask = batches[-1]
  assert last_mask.tolist() == [True, True, True, False, False]
  assert not last_images[3:].any() and not last_labels[3:].any()


# ---------------------------------------------------------------------------- preprocessing


def test_preprocess_values_shapes_and_jit():
  images = np.zeros((2, 28, 28, 1), np.uint8)
  images[0, 3, 4, 0] = 255
  images[1] = 51
  out = data.preprocess(images, 0.1307, 0.3081, 28)
  assert out.shape == (2, 28, 28, 1) and out.dtype == jnp.float32
  np.testing.assert_allclose(out[0, 3, 4, 0], (1.0 - 0.1307) / 0.3081, rtol=1e-6)
  np.testing.assert_allclose(out[0, 0, 0, 0], -0.1307 / 0.3081, rtol=1e-6)
  np.testing.assert_allclose(out[1], (0.2 - 0.1307) / 0.3081, rtol=1e-6)
  step = jax.jit(data.preprocess, static_argnums=(1, 2, 3, 4))
  big = step(images, 0.1307, 0.3081, 112, jnp.bfloat16)
  assert big.shape == (2, 112, 112, 1) and big.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(step(images, 0.1307, 0.3081, 112, jnp.float32))[1],
    (0.2 - 0.1307) / 0.3081,
    rtol=1e-5,
  )
  np.testing.assert_allclose(step(images, 0.1307, 0.3081, 28, jnp.float32), out, rtol=1e-6)


# ---------------------------------------------------------------------------- prototypes


def test_test_size_takes_a_seeded_subset_of_the_test_split(tmp_path):
  from tests import synthetic

  idx_dir = synthetic.write_dataset(str(tmp_path / 'idx'))
  full = data.load_datasets(data.DataSpec(source='idx', idx_dir=idx_dir, val_size=40))
  spec = data.DataSpec(source='idx', idx_dir=idx_dir, val_size=40, test_size=7, split_seed=3)
  part = data.load_datasets(spec)
  assert len(part.test) == 7 and len(part.train) == len(full.train)
  keep = np.sort(np.random.default_rng(3).permutation(len(full.test))[:7])
  np.testing.assert_array_equal(part.test.images, full.test.images[keep])
  np.testing.assert_array_equal(part.test.labels, full.test.labels[keep])
  big = data.load_datasets(
    data.DataSpec(source='idx', idx_dir=idx_dir, val_size=40, test_size=10**6)
  )
  assert len(big.test) == len(full.test)
