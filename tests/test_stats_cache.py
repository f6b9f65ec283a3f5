"""The per-channel mean and std of a train split: one chunked pass over a record source
against numpy on the whole array, and their cache in the workdir (reused, recomputed when the
key differs, never needed without a workdir)."""

import json
import os

import numpy as np
import pytest

from bcam_jax import data
from bcam_jax.data import records, stats_cache

KEY = {'source': 'folder', 'name': 'x', 'location': '/d', 'image_size': 5, 'channels': 3}


def _split(seed=0, n=11, channels=3):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 5, 5, channels), np.uint8)
  return data.Split(images, np.zeros(n, np.int32))


@pytest.mark.parametrize('chunk, workers', [(1, 1), (4, 2), (1024, 1)])
def test_channel_stats_against_numpy(chunk, workers):
  split = _split()
  mean, std = records.channel_stats(records.SplitRecords(split), chunk=chunk, workers=workers)
  pixels = split.images.reshape(-1, 3).astype(np.float64) / 255
  np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-12)
  np.testing.assert_allclose(std, pixels.std(0), rtol=1e-12)
  assert len(mean) == len(std) == 3


def test_stats_are_cached_and_reused(tmp_path, monkeypatch):
  split = _split()
  first = stats_cache.load_or_compute_stats(str(tmp_path), KEY, records.SplitRecords(split))
  path = tmp_path / stats_cache.STATS_FILE
  entry = json.loads(path.read_text())
  assert entry['key'] == KEY and tuple(entry['mean']) == first[0]

  def must_not_run(*args, **kwargs):
    raise AssertionError('statistics recomputed')

  monkeypatch.setattr(stats_cache, 'channel_stats', must_not_run)
  other = records.SplitRecords(_split(seed=1))  # would give other numbers
  assert stats_cache.load_or_compute_stats(str(tmp_path), KEY, other) == first
  assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]


def test_another_key_recomputes_and_overwrites(tmp_path):
  stats_cache.load_or_compute_stats(str(tmp_path), KEY, records.SplitRecords(_split()))
  key = KEY | {'image_size': 7}
  split = _split(seed=2)
  mean, std = stats_cache.load_or_compute_stats(str(tmp_path), key, records.SplitRecords(split))
  pixels = split.images.reshape(-1, 3).astype(np.float64) / 255
  np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-12)
  assert json.loads((tmp_path / stats_cache.STATS_FILE).read_text())['key'] == key


def test_unreadable_cache_is_recomputed_and_no_dir_writes_nothing(tmp_path):
  (tmp_path / stats_cache.STATS_FILE).write_text('{ truncated')
  split = _split(channels=1)
  mean, _ = stats_cache.load_or_compute_stats(str(tmp_path), KEY, records.SplitRecords(split))
  np.testing.assert_allclose(mean, [split.images.mean() / 255], rtol=1e-12)
  assert json.loads((tmp_path / stats_cache.STATS_FILE).read_text())['key'] == KEY
  stats_cache.load_or_compute_stats(None, KEY, records.SplitRecords(split))
  stats_cache.load_or_compute_stats(str(tmp_path / 'w'), KEY, records.SplitRecords(split), False)
  assert not (tmp_path / 'w').exists()
