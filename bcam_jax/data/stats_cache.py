"""Per-channel mean and std of a train split, computed once and cached in the workdir.

Datasets without literature constants (image folders, TFDS datasets by name) are normalised
by the statistics of their train split. Counting them means reading every train image, so
they are written to ``<workdir>/data_stats.json`` with the key they were computed for (the
source, the dataset, where it lives, ``image_size``, ``channels`` and the number of train
images) and read back on resume and by eval.py. A file whose key differs (another image
size, another folder, ...) is recomputed and overwritten, with a log line saying why.
"""

import json
import os

from absl import logging

from bcam_jax import io_utils
from bcam_jax.data.records import RecordSource, channel_stats

STATS_FILE = 'data_stats.json'

Stats = tuple[tuple[float, ...], tuple[float, ...]]


def _read(path: str) -> dict | None:
  """The cached entry, or None (with a log line) when the file cannot be used."""
  try:
    with open(path, encoding='utf-8') as f:
      entry = json.load(f)
    if not (isinstance(entry, dict) and {'key', 'mean', 'std'} <= set(entry)):
      raise ValueError('expected an object with key, mean and std')
    return entry
  except (OSError, ValueError) as e:
    logging.warning('%s cannot be read (%s); recomputing the mean and std.', path, e)
    return None


def load_or_compute_stats(
  stats_dir: str | None,
  key: dict,
  source: RecordSource,
  write: bool = True,
) -> Stats:
  """(mean, std) per channel of `source` (`records.channel_stats`), cached in
  `<stats_dir>/data_stats.json` under `key` (a JSON-serialisable dict).

  Without `stats_dir` nothing is cached. With it, a cached entry for the same `key` is
  returned as is; otherwise the statistics are computed and, when `write` (false in the
  other processes of a multi-process job), written atomically.
  """
  path = os.path.join(stats_dir, STATS_FILE) if stats_dir else None
  if path and os.path.exists(path):
    entry = _read(path)
    if entry is not None and entry['key'] == key:
      logging.info('Reusing the per-channel mean and std of %s from %s.', key, path)
      return tuple(entry['mean']), tuple(entry['std'])
    if entry is not None:
      logging.info(
        'Recomputing the per-channel mean and std: %s holds them for %s, not %s.',
        path,
        entry['key'],
        key,
      )
  mean, std = channel_stats(source)
  if path and write:
    os.makedirs(stats_dir, exist_ok=True)
    io_utils.write_json(path, {'key': key, 'mean': list(mean), 'std': list(std)})
    logging.info(
      'Computed the per-channel mean (%s) and std (%s) of the train split -> %s.',
      ', '.join(f'{m:.4f}' for m in mean),
      ', '.join(f'{s:.4f}' for s in std),
      path,
    )
  return mean, std
