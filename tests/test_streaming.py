"""Streamed splits (`data.streaming`): a folder over the in-memory limit gives bitwise the
batches, statistics and prototypes of the in-memory path; a killed streamed run resumes to
the parameters of an uninterrupted in-memory one; read-ahead, sources and config checks."""

import json
import logging
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bcam_jax import config_validation, data, prototypes
from bcam_jax.configs import base
from bcam_jax.data import streaming
from tests import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  """JPEGs of 16 px (resized to 12 when read): 30 train and 12 test images, no val folder."""
  directory = str(tmp_path_factory.mktemp('stream'))
  return synthetic.write_folder(directory, {'train': 10, 'test': 4}, size=16, ext='jpg')


def data_config(root, **fields):
  config = base.get_base_config().data
  config.source, config.name, config.folder_dir = 'folder', 'shapes', root
  config.image_size, config.val_size = 12, 6
  for key, value in fields.items():
    config[key] = value
  return config


def _load(root, **fields):
  return data.load_datasets(data.DataSpec.from_config(data_config(root, **fields)))


@pytest.fixture(scope='module')
def both(root):
  """(in memory, streamed by 'auto' over a 1 KiB limit) datasets of the same folder."""
  memory = _load(root, stream='memory')
  streamed = _load(root, stream='auto', in_memory_limit_mb=0.001)
  return memory, streamed


def test_auto_streams_over_the_limit_and_says_so(root, caplog):
  with caplog.at_level(logging.INFO):
    streamed = _load(root, in_memory_limit_mb=0.01, decode_workers=2)
  assert all(data.is_streamed(s) for s in (streamed.train, streamed.val, streamed.test))
  assert streamed.train.images.workers == 2
  # 42 images of 12 x 12 x 3 (channels 0 counts 3) = 0.0173 MiB > 0.01.
  assert "data.stream='auto', data.in_memory_limit_mb=0.01: streamed from disk" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.INFO):
    memory = _load(root, in_memory_limit_mb=0.02)
  assert not data.is_streamed(memory.train) and isinstance(memory.train.images, np.ndarray)
  assert 'data.in_memory_limit_mb=0.02: read into memory' in caplog.text


def test_streamed_splits_hold_the_in_memory_arrays(both):
  memory, streamed = both
  assert streamed.info == memory.info  # classes, channels, mean and std (exact)
  for name in ('train', 'val', 'test'):
    m, s = getattr(memory, name), getattr(streamed, name)
    assert data.is_streamed(s) and len(s) == len(m)
    assert s.images.shape == m.images.shape and s.images.dtype == np.uint8
    np.testing.assert_array_equal(s.labels, m.labels)
    np.testing.assert_array_equal(s.images[:], m.images)
  # Indexing as numpy does: ints, negative ints, strided slices, repeats, boolean masks.
  m, s = memory.train.images, streamed.train.images
  np.testing.assert_array_equal(s[-1], m[-1])
  np.testing.assert_array_equal(s[3:20:4], m[3:20:4])
  np.testing.assert_array_equal(s[np.array([5, 0, 5, 23])], m[np.array([5, 0, 5, 23])])
  mask = memory.train.labels == 2
  np.testing.assert_array_equal(s[mask], m[mask])
  np.testing.assert_array_equal(np.asarray(s), m)


def test_streamed_batches_are_the_in_memory_batches(both):
  """Several epochs of training batches (from step 0 and resumed mid-epoch, on a process's
  rows) and every padded eval batch, bitwise."""
  memory, streamed = both
  for start, rows in ((0, slice(None)), (4, slice(2, 6))):  # 3 steps per epoch of 8 of 24
    want = list(data.train_batches(memory.train, 8, 7, start, 8))
    got = list(data.train_batches(streamed.train, 8, 7, start, 8, rows))
    assert len(got) == len(want) == 8 - start
    for step, ((gi, gl), (wi, wl)) in enumerate(zip(got, want), start):
      idx = data.train_batch_indices(24, 8, 7, step)[rows]
      np.testing.assert_array_equal(gi, wi[rows])
      np.testing.assert_array_equal(gl, wl[rows])
      np.testing.assert_array_equal(gl, memory.train.labels[idx])  # the step's examples
  for name in ('val', 'test'):
    want = list(data.eval_batches(getattr(memory, name), 5))
    got = list(
      data.prefetched(getattr(streamed, name), data.eval_batches(getattr(streamed, name), 5))
    )
    assert len(got) == len(want)
    for g, w in zip(got, want):
      for a, b in zip(g, w):
        np.testing.assert_array_equal(a, b)


def test_streamed_prototypes_are_the_in_memory_prototypes(both):
  memory, streamed = both
  for name in ('train', 'val'):
    want = prototypes.class_prototypes(getattr(memory, name), 3, 12)
    got = prototypes.class_prototypes(getattr(streamed, name), 3, 12)
    np.testing.assert_array_equal(got, want)
  # The chunked pass, against numpy; a class without examples counts 0.
  sums, counts = streaming.streamed_class_sums(streamed.train, 4)
  assert counts.tolist() == [8, 8, 8, 0]
  np.testing.assert_array_equal(sums[3], 0)
  for c in range(3):
    members = memory.train.images[memory.train.labels == c]
    np.testing.assert_array_equal(sums[c], members.astype(np.int64).sum(0))


def test_read_ahead_keeps_order_raises_in_place_and_stops_when_closed():
  produced = []

  def numbers(n, fail_at=None):
    for i in range(n):
      if i == fail_at:
        raise OSError(f'item {i} is unreadable')
      produced.append(i)
      yield i

  assert list(streaming.read_ahead(numbers(50), 3)) == list(range(50))
  got = []
  with pytest.raises(OSError, match='item 4 is unreadable'):
    for item in streaming.read_ahead(numbers(10, fail_at=4), 2):
      got.append(item)
  assert got == [0, 1, 2, 3]
  produced.clear()
  ahead = streaming.read_ahead(numbers(1000), 2)
  assert [next(ahead) for _ in range(3)] == [0, 1, 2]
  ahead.close()
  assert len(produced) <= 3 + 2 + 1  # consumed, buffered, the one in hand
  assert not any(t.name == 'bcam-read-ahead' for t in threading.enumerate())


class _Source:
  """A record source of `n` images (4, 4, 1) of value i; `bad` returns a wrong shape."""

  def __init__(self, n, bad=None):
    self.n, self.bad = n, bad

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    side = 5 if i == self.bad else 4
    return np.full((side, 4, 1), i, np.uint8), i % 2

  def __repr__(self):
    return '_Source'


def test_a_generic_source_streams_and_bad_items_are_named():
  split = data.StreamedSplit(_Source(9), (4, 4, 1), workers=3)
  np.testing.assert_array_equal(split.labels, np.arange(9) % 2)  # read once: no `labels`
  np.testing.assert_array_equal(split.images[[8, 1]][:, 0, 0, 0], [8, 1])
  subset = split.take(np.array([7, 2]))
  assert len(subset) == 2 and subset.labels.tolist() == [1, 0]
  np.testing.assert_array_equal(subset.images[:][:, 0, 0, 0], [7, 2])
  broken = data.StreamedSplit(_Source(9, bad=6), (4, 4, 1), workers=3)
  with pytest.raises(data.DataError, match=r'_Source item 6: image is uint8 \(5, 4, 1\), expected'):
    broken.images[:]
  with pytest.raises(data.DataError, match='workers must be a positive integer; got 0'):
    data.StreamedSplit(_Source(2), (4, 4, 1), workers=0)


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'stream': 'yes'}, r"config.data.stream='yes' is not valid; choose one of \('auto'"),
    (
      {'stream': 'stream', 'source': 'idx'},
      r"stream='stream' streams image folders .* and TFDS datasets by name",
    ),
    ({'in_memory_limit_mb': -1}, r'in_memory_limit_mb=-1.0; expected a number of MiB >= 0'),
    ({'decode_workers': -2}, r'config.data.decode_workers=-2; expected a non-negative'),
  ],
)
def test_stream_fields_are_checked(root, fields, message):
  config = base.get_base_config()
  config.data = data_config(root)
  for key, value in fields.items():
    config.data[key] = value
  if config.data.source == 'idx':
    config.data.name, config.data.folder_dir = 'mnist', ''
  with pytest.raises(config_validation.ConfigError, match=message):
    config_validation.validate_config(config)


def _train(root, workdir, *flags, kill_at=None):
  """train.py (or tests/kill_at.py `kill_at`) on the folder: simple_cnn at 12 px, 12 steps of
  8 (3 per epoch), train states at 4, 8, 12, validation at 6 and 12, both augmentations."""
  args = [
    f'--workdir={workdir}',
    '--config=configs/experiment.py:model=simple_cnn',
    '--config.data.source=folder',
    '--config.data.name=shapes',
    f'--config.data.folder_dir={root}',
    '--config.data.image_size=12',
    '--config.data.val_size=6',
    '--config.data.augment.random_resized_crop=True',
    '--config.data.augment.horizontal_flip=True',
    '--config.train.batch_size=8',
    '--config.train.num_steps=12',
    '--config.train.checkpoint_every_steps=4',
    '--config.train.eval_every_steps=6',
    '--config.train.log_every_steps=4',
    '--config.eval.batch_size=5',
    *flags,
  ]
  script = ['tests/kill_at.py', 'save', str(kill_at), 'SIGKILL'] if kill_at else ['train.py']
  return subprocess.run(
    [sys.executable, *script, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),  # the run's compilation cache (conftest.py)
  )


def _final(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    assert manager.latest_step() == 12
    params = manager.restore(12)['params']
  with open(os.path.join(workdir, 'results.json')) as f:
    return params, json.load(f)


def test_killed_streamed_run_resumes_to_the_uninterrupted_in_memory_run(root, tmp_path):
  memory = str(tmp_path / 'memory')
  done = _train(root, memory, '--config.data.stream=memory')
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'read into memory' in done.stderr

  streamed = str(tmp_path / 'streamed')
  stream = '--config.data.stream=stream'
  killed = _train(root, streamed, stream, kill_at=8)
  assert killed.returncode != 0 and 'streamed from disk' in killed.stderr, killed.stderr[-3000:]
  assert not os.path.exists(os.path.join(streamed, 'results.json'))
  resumed = _train(root, streamed, stream)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  at = int(resumed.stderr.split('Resumed from')[1].split('at step ')[1].split('.')[0])
  assert at in (4, 8)  # mid-epoch either way (3 steps per epoch)

  (want, want_results), (got, got_results) = _final(memory), _final(streamed)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  # Validation and test ran on the streamed splits and measured what the in-memory ones did.
  for key in ('test_loss', 'test_accuracy', 'test_bcam_loss', 'best_checkpoint_step'):
    assert got_results[key] == want_results[key], key
