"""Where a run's numbers go: `metrics.jsonl`, TensorBoard event files and the console."""

import json
import logging as py_logging
import os
import time

from absl import logging
from tensorboardX import SummaryWriter

from bcam_jax import io_utils


class MetricLogger:
  """Writes one JSON line per (step, split) and the same scalars to TensorBoard.

  Only the writing process (process 0 of a multi-process job) writes; the others no-op.
  `resumed_step`: the step a resumed run restarts from. What an earlier session logged past
  it (steps it will replay, and its final test) is dropped from metrics.jsonl and purged
  from TensorBoard, so every step appears once.
  """

  def __init__(self, workdir: str, enabled: bool = True, resumed_step: int | None = None):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      if resumed_step is not None and os.path.exists(path):
        _drop_records_after(path, resumed_step)
      self._jsonl = open(path, 'a', encoding='utf-8')
      self._tb = SummaryWriter(
        os.path.join(workdir, 'tensorboard'),
        purge_step=None if resumed_step is None else resumed_step + 1,
      )

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {
      'step': int(step),
      'split': split,
      'time': time.time(),
      **{k: float(v) for k, v in metrics.items()},
    }
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(f'{split}/{k}', float(v), int(step))

  def write_image(self, step: int, tag: str, image) -> None:
    """A grey (H, W) image in [0, 1] to TensorBoard."""
    if self.enabled:
      self._tb.add_image(tag, image[None], int(step), dataformats='CHW')

  def info(self, message: str) -> None:
    if self.enabled:
      logging.info(message)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _drop_records_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl (atomically) without the records past `step` and without test
  records; a torn last line of a killed run goes too."""
  kept = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if record.get('step', 0) <= step and record.get('split') != 'test':
        kept.append(line if line.endswith('\n') else line + '\n')
  text = ''.join(kept).encode()
  io_utils.atomic_write(path, lambda f: f.write(text))


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


def quiet_library_logs() -> None:
  """Hides the INFO chatter of Orbax and TFDS on the console; warnings still show."""

  def keep(record: py_logging.LogRecord) -> bool:
    noisy = any(part in record.pathname for part in ('/orbax/', '/tensorflow_datasets/'))
    return record.levelno >= py_logging.WARNING or not noisy

  logging.get_absl_handler().addFilter(keep)
