"""Fine-tuning a pretrained-layout network at 224 px through `train.py`: time per step,
images per second and peak memory of `configs/finetune.py`'s protocols, end to end.

Writes, into a work folder, an image folder of `--classes` classes of 256x256 JPEGs (a
coloured patch in a class-specific place on noise; train.py resizes and centre-crops them
to 224) and a state_dict of torchvision's `resnet50()` with random weights standing in for
ImageNet's (none can be downloaded here; `--weights` takes a real file), then runs
`train.py --config=configs/finetune.py:<protocol>` for each protocol in its own process
(`--steps` steps, logging every `--log_every`) and reads its metrics.jsonl: the step time
and img/s are the medians of the logging windows after the first (which holds the
compilation), the first window's seconds are reported as start-up. Peak memory: the
process's peak RSS (CPU), or the GPU's largest `memory.used` from nvidia-smi polled each
second while the run trains (GPU; XLA_PYTHON_CLIENT_PREALLOCATE=false so it is what XLA
holds, not a preallocation). Prints a table; writes finetune.json to `--out_dir`.

  python bench/finetune.py --out_dir=bench/results/finetune_cpu          # CPU: batch 8, 3 steps
  python bench/finetune.py --batch=128 --steps=300 --log_every=50 --dtype=bfloat16 \
      --protocols=bcpl --out_dir=$OUT/finetune                              # on a GPU
"""

import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROTOCOLS = flags.DEFINE_list('protocols', ['bcpl', 'ca_stream', 'softcam'], 'Protocols.')
_MODEL = flags.DEFINE_string('model', 'resnet50', 'Model (torchvision layout when generated).')
_BATCH = flags.DEFINE_integer('batch', 8, 'Global batch.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Train steps per protocol.')
_LOG_EVERY = flags.DEFINE_integer('log_every', 1, 'Steps per logging window.')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Compute dtype.')
_CLASSES = flags.DEFINE_integer('classes', 10, 'Classes of the generated folder.')
_PER_CLASS = flags.DEFINE_integer('per_class', 20, 'Train images per class (val, test: 2).')
_WEIGHTS = flags.DEFINE_string('weights', None, 'A weights file; default: generated.')
_WORK = flags.DEFINE_string('work_dir', '/tmp/bcam_finetune', 'Folder, weights and workdirs.')
_OUT = flags.DEFINE_string('out_dir', 'bench/results/finetune', 'Where finetune.json goes.')
_TIMEOUT = flags.DEFINE_integer('timeout_s', 3600, 'Per protocol run.')


def write_folder(root: str, classes: int, per_class: int) -> str:
  """`classes` classes of 256x256 JPEGs: noise with a bright patch whose colour and place
  depend on the class (train `per_class`, val and test 2 per class)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  if os.path.isdir(os.path.join(root, 'test')):
    return root
  rng = np.random.default_rng(0)
  for split, n in (('train', per_class), ('val', 2), ('test', 2)):
    for c in range(classes):
      directory = os.path.join(root, split, f'class{c:02d}')
      os.makedirs(directory, exist_ok=True)
      for k in range(n):
        image = rng.integers(0, 80, (256, 256, 3), dtype=np.uint8)
        top, left = 64 * (c % 3), 64 * ((c // 3) % 3)
        image[top : top + 96, left : left + 96, c % 3] = 255
        Image.fromarray(image).save(os.path.join(directory, f'{k}.jpg'), quality=90)
  return root


def write_weights(path: str, model: str, folder: str) -> str:
  """torchvision's `model()` with its own random initialisation and BatchNorm statistics
  measured on 128 of the folder's train images (as published weights carry statistics of
  their data; a fresh model's mean 0 / variance 1 would blow a frozen backbone's activations
  up), as a state_dict file."""
  if os.path.exists(path):
    return path
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  net = getattr(torchvision.models, model)()
  files = sorted(
    os.path.join(root, name)
    for root, _, names in os.walk(os.path.join(folder, 'train'))
    for name in names
  )
  rng = np.random.default_rng(0)
  picked = rng.permutation(len(files))[:128]
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  images = np.stack(
    [
      np.asarray(Image.open(files[i]).convert('RGB').resize((224, 224)), np.float32) / 255
      for i in picked
    ]
  )
  batch = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy())
  for module in net.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.momentum = None  # the cumulative average over the batches below
  net.train()
  with torch.no_grad():
    for chunk in batch.split(16):
      net(chunk)
  torch.save(net.state_dict(), path + '.tmp')
  os.replace(path + '.tmp', path)
  return path


class GpuMemory:
  """The largest `memory.used` (MiB) nvidia-smi reports while running; None without it."""

  def __init__(self):
    self.peak, self._stop = None, threading.Event()
    self._thread = threading.Thread(target=self._poll, daemon=True)

  def _poll(self):
    while not self._stop.is_set():
      try:
        used = max(float(v) for v in _nvidia_smi('memory.used', ',nounits').split())
      except ValueError:  # no GPU
        return
      self.peak = used if self.peak is None else max(self.peak, used)
      self._stop.wait(1.0)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def run_protocol(protocol: str, folder: str, weights: str, workdir: str) -> dict:
  """One train.py run; its timings from metrics.jsonl."""
  cmd = [
    sys.executable,
    'train.py',
    f'--config=configs/finetune.py:{protocol}',
    f'--workdir={workdir}',
    f'--config.model.name={_MODEL.value}',
    f'--config.data.folder_dir={folder}',
    f'--config.init.pretrained={weights}',
    f'--config.train.batch_size={_BATCH.value}',
    f'--config.train.num_steps={_STEPS.value}',
    f'--config.train.log_every_steps={_LOG_EVERY.value}',
    f'--config.train.eval_every_steps={_STEPS.value}',
    f'--config.train.checkpoint_every_steps={_STEPS.value}',
    f'--config.train.dtype={_DTYPE.value}',
    '--config.eval.batch_size=20',
  ]
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false')
  start = time.time()
  log_path = workdir + '.log'
  with GpuMemory() as gpu, open(log_path, 'w') as log:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    timer = threading.Timer(_TIMEOUT.value, proc.kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    timer.cancel()
  wall = time.time() - start
  returncode = os.waitstatus_to_exitcode(status)
  row = {'protocol': protocol, 'returncode': returncode, 'wall_s': wall, 'log': log_path}
  if returncode != 0:
    row['error'] = open(log_path).read()[-2000:]
    return row
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  train = [r for r in records if r['split'] == 'train']
  steady = train[1:] or train
  rates = [r['images_per_second'] for r in steady]
  img_s = statistics.median(rates)
  test = [r for r in records if r['split'] == 'test']
  row.update(
    img_s=img_s,
    step_ms=1000 * _BATCH.value / img_s,
    windows=len(rates),
    first_window_s=_LOG_EVERY.value * _BATCH.value / train[0]['images_per_second'],
    last_train_loss=train[-1]['loss'],
    test_accuracy=test[-1]['accuracy'] if test else None,
    peak_rss_mib=usage.ru_maxrss / 1024,
    peak_gpu_mib=gpu.peak,
  )
  return row


def _nvidia_smi(query: str, extra: str = '') -> str:
  """nvidia-smi's answer to `--query-gpu=<query>` as CSV, '' without nvidia-smi."""
  try:
    return subprocess.run(
      ['nvidia-smi', f'--query-gpu={query}', f'--format=csv,noheader{extra}'],
      capture_output=True,
      text=True,
      timeout=20,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ''


def _device() -> str:
  """The GPU's name from nvidia-smi, else the CPU count (no JAX in this process: on a GPU it
  would take memory from the runs it measures)."""
  return _nvidia_smi('name') or f'CPU ({os.cpu_count()} cores)'


def table(rows: list[dict], header: dict) -> str:
  lines = [
    f'{header["model"]} at 224 px, batch {header["batch"]}, {header["dtype"]}, '
    f'{header["steps"]} steps, {header["device"]}',
    '',
    '| protocol | step ms | img/s | first window s | wall s | peak RSS MiB | peak GPU MiB |'
    ' final train loss | test accuracy |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  fmt = lambda v, spec: '-' if v is None else format(v, spec)
  for r in rows:
    if r['returncode'] != 0:
      lines.append(f'| {r["protocol"]} | failed (exit {r["returncode"]}) | | | | | | | |')
      continue
    lines.append(
      f'| {r["protocol"]} | {r["step_ms"]:.0f} | {r["img_s"]:.1f} | '
      f'{r["first_window_s"]:.1f} | {r["wall_s"]:.0f} | {r["peak_rss_mib"]:.0f} | '
      f'{fmt(r["peak_gpu_mib"], ".0f")} | {r["last_train_loss"]:.3f} | '
      f'{fmt(r["test_accuracy"], ".3f")} |'
    )
  return '\n'.join(lines)


def main(argv):
  del argv
  os.makedirs(_WORK.value, exist_ok=True)
  folder = write_folder(os.path.join(_WORK.value, 'folder'), _CLASSES.value, _PER_CLASS.value)
  weights = _WEIGHTS.value or write_weights(
    os.path.join(_WORK.value, f'{_MODEL.value}.pth'), _MODEL.value, folder
  )
  header = {
    'model': _MODEL.value,
    'batch': _BATCH.value,
    'dtype': _DTYPE.value,
    'steps': _STEPS.value,
    'device': _device(),
    'cpus': os.cpu_count(),
  }
  rows = []
  for protocol in _PROTOCOLS.value:
    workdir = os.path.join(_WORK.value, f'run_{protocol}_{int(time.time())}')
    rows.append(run_protocol(protocol, folder, weights, workdir))
    print(f'{protocol}: {json.dumps(rows[-1])[:400]}', flush=True)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, 'finetune.json'), 'w') as f:
    json.dump({'header': header, 'rows': rows}, f, indent=2)
  print(table(rows, header))


if __name__ == '__main__':
  app.run(main)
