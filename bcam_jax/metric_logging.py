"""Where a run's numbers go: `metrics.jsonl`, TensorBoard event files and the console."""
import json
import logging as py_logging
import os
import time

from absl import logging
from tensorboardX import SummaryWriter


class MetricLogger:
  """Writes one JSON line per (step, split) and the same scalars to TensorBoard.

  Only the writing process (process 0 of a multi-process job) writes; the others no-op.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split, 'time': time.time(),
              **{k: float(v) for k, v in metrics.items()}}
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
