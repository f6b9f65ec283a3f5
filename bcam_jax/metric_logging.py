"""Where a run's numbers go: `metrics.jsonl`, TensorBoard event files and the console."""

import importlib.util
import json
import logging as py_logging
import os
import time

import numpy as np
from absl import logging
from tensorboardX import SummaryWriter

from bcam_jax import io_utils


class MetricLogger:
  """Writes one JSON line per (step, split) to `<workdir>/metrics.jsonl` and the same
  scalars, plus images and text, to TensorBoard in `<workdir>/tensorboard`.

  Only the writing process (process 0 of a multi-process job) writes; the others no-op.
  `resumed_step`: the step a resumed run restarts from. What an earlier session logged past
  it (steps it will replay, and its final test) is dropped from metrics.jsonl and purged
  from TensorBoard, so every step appears once. `jsonl=False` writes TensorBoard only
  (eval.py, whose numbers are in its metrics.json).
  """

  def __init__(
    self,
    workdir: str,
    enabled: bool = True,
    resumed_step: int | None = None,
    jsonl: bool = True,
  ):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if jsonl:
        path = os.path.join(workdir, 'metrics.jsonl')
        if resumed_step is not None and os.path.exists(path):
          _drop_records_after(path, resumed_step)
        self._jsonl = open(path, 'a', encoding='utf-8')
      self._tb = SummaryWriter(
        tensorboard_dir(workdir),
        purge_step=None if resumed_step is None else resumed_step + 1,
      )

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    if self._jsonl is not None:
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
    """An image in [0, 1] to TensorBoard: grey (H, W) or RGB (H, W, 3)."""
    if self.enabled:
      image = np.asarray(image)
      chw = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
      self._tb.add_image(tag, chw, int(step), dataformats='CHW')

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Markdown text to TensorBoard's Text tab (e.g. the run's config)."""
    if self.enabled:
      self._tb.add_text(tag, text, int(step))

  def info(self, message: str) -> None:
    if self.enabled:
      logging.info(message)

  def close(self) -> None:
    if self.enabled:
      if self._jsonl is not None:
        self._jsonl.close()
      self._tb.close()


def tensorboard_dir(workdir: str) -> str:
  """Where `MetricLogger(workdir)` writes its TensorBoard event files."""
  return os.path.join(workdir, 'tensorboard')


def tensorboard_hint(logdir: str) -> str:
  """How to view the event files in `logdir`: the command where TensorBoard is installed,
  else how to install it."""
  if importlib.util.find_spec('tensorboard') is not None:
    return f'TensorBoard: tensorboard --logdir {logdir}'
  return f'TensorBoard files in {logdir} (pip install tensorboard to view them)'


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


# Path part of a library -> the lowest level of its records that the console shows.
# TFDS's warnings go too: they come from probing for a prepared copy (e.g. "Variant folder
# ... has no dataset_info.json" when IDX files are used), whose outcome bcam_jax.data
# reports itself.
_LIBRARY_LEVELS = {
  '/tensorflow_datasets/': py_logging.ERROR,
  '/orbax/': py_logging.WARNING,
  '/jax/': py_logging.WARNING,
  '/jaxlib/': py_logging.WARNING,
  '/optax/': py_logging.WARNING,
  '/tensorboardX/': py_logging.WARNING,
}


class _ConsoleFormatter(py_logging.Formatter):
  """`08:01:12 message` for bcam-jax's own INFO lines; absl's full prefix (level, time,
  thread, file:line) for everything else, so that warnings and errors say where they
  come from."""

  def __init__(self, fallback: py_logging.Formatter):
    super().__init__('%(asctime)s %(message)s', datefmt='%H:%M:%S')
    self._fallback = fallback

  def format(self, record: py_logging.LogRecord) -> str:
    own = f'{os.sep}bcam_jax{os.sep}' in record.pathname
    if own and record.levelno == py_logging.INFO:
      return super().format(record)
    return self._fallback.format(record)


def quiet_library_logs() -> None:
  """Console set-up of the entry points: hides the chatter of TFDS, and the INFO lines of
  Orbax, JAX (its backend probing, e.g. 'Unable to initialize backend tpu') and optax,
  whose warnings still show; bcam-jax's own lines lose absl's 60-character prefix."""

  def keep(record: py_logging.LogRecord) -> bool:
    for part, level in _LIBRARY_LEVELS.items():
      if part in record.pathname:
        return record.levelno >= level
    return True

  handler = logging.get_absl_handler()
  handler.addFilter(keep)
  handler.setFormatter(_ConsoleFormatter(logging.PythonFormatter()))
