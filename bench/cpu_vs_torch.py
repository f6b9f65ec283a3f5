"""Train-step throughput of bcam_jax against the same models in PyTorch eager, on CPU.

For each model and loss (`ce`, `bcpl` with L1), builds the library's jitted train step
(`bcam_jax.steps.make_train_step`, exactly what train.py runs) and the PyTorch twin of
bench/torch_models.py (same layers, loss and SGD step), then times them alternately in one
run: `--rounds` rounds, each `--steps` steps of one then `--steps` of the other, so both
see the same machine load. Reports the median img/s of each and their ratio, ours/PyTorch
(> 1: we are faster). PyTorch is a bench-only dependency: pip install -r bench/requirements.txt.

  python bench/cpu_vs_torch.py                              # every model, ce and bcpl
  python bench/cpu_vs_torch.py --models=resnet18 --losses=bcpl --conv_lowering=xla
  python bench/cpu_vs_torch.py --before_lowering=auto_xla_grad  # + "auto" before issue 21
"""

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bcam_jax import data, models, optim, parallel, steps  # noqa: E402
from bcam_jax import objective as objective_lib  # noqa: E402
from bcam_jax.configs import base  # noqa: E402
from bench import common  # noqa: E402

_MODELS = flags.DEFINE_list('models', list(common.MODEL_VARIANTS), 'Models to time.')
_LOSSES = flags.DEFINE_list('losses', ['ce', 'bcpl'], 'Losses to time.')
_BATCH = flags.DEFINE_integer('batch', 128, 'Batch size.')
_SIZE = flags.DEFINE_integer('size', 28, 'Image side.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Steps per timed round.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternating rounds per framework.')
_LOWERING = flags.DEFINE_enum(
  'conv_lowering', 'auto', models.conv.LOWERINGS, 'Convolution lowering of our models.'
)
_BEFORE = flags.DEFINE_enum(
  'before_lowering',
  None,
  models.conv.LOWERINGS,
  'If set, also times our step with this lowering in the same rounds (auto_xla_grad: the '
  '"auto" rule before issue 21) and reports the speed-up of --conv_lowering over it.',
)
_OUT = flags.DEFINE_string('out', 'bench/results/cpu_vs_torch.json', 'JSON output path.')


def jax_step(name, options, kind, batch, size, lowering):
  """A zero-argument function running one of our train steps on a fixed batch."""
  mesh = parallel.make_mesh()
  info = data.dataset_info('mnist')
  model = models.get_model(name, info.num_classes, conv_lowering=lowering, **options)
  config = base.get_base_config()
  tx, schedule = optim.make_optimizer(config.optimizer, total_steps=1000)
  state = jax.jit(
    steps.make_init_fn(model, tx, seed=0, image_size=size), out_shardings=parallel.replicated(mesh)
  )()
  objective = objective_lib.Objective(kind=kind, metric='l1', lambda_cam=0.1, prototype_size=size)
  train_step = jax.jit(
    common.train_step_fn(model, tx, schedule, objective, info, size),
    out_shardings=parallel.replicated(mesh),
    donate_argnums=0,
  )
  rng = np.random.default_rng(0)
  images, labels = parallel.shard_batch(
    mesh,
    rng.integers(0, 256, (batch, size, size, 1), dtype=np.uint8),
    rng.integers(0, 10, batch).astype(np.int32),
  )
  prototypes = jax.device_put(rng.random((10, size, size), np.float32), parallel.replicated(mesh))
  holder = {'state': state}

  def run():
    holder['state'], metrics = train_step(holder['state'], images, labels, prototypes)
    jax.block_until_ready(metrics)

  return run


def torch_step(variant, kind, batch, size):
  """The same for the PyTorch twin."""
  import torch  # pylint: disable=import-outside-toplevel

  from bench import torch_models  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  model = torch_models.MODELS[variant]()
  info = data.dataset_info('mnist')
  step = torch_models.make_train_step(model, kind, info.mean, info.std)
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.integers(0, 256, (batch, size, size, 1), dtype=np.uint8))
  labels = torch.from_numpy(rng.integers(0, 10, batch).astype(np.int64))
  prototypes = torch.from_numpy(rng.random((10, size, size), np.float32))
  return lambda: step(images, labels, prototypes)


def _seconds_per_step(fn, n):
  start = time.perf_counter()
  for _ in range(n):
    fn()
  return (time.perf_counter() - start) / n


def compare(variant, kind, batch, size, n_steps, rounds, lowering, before=None) -> dict:
  name, options = common.MODEL_VARIANTS[variant]
  steps_of = {
    'ours': jax_step(name, options, kind, batch, size, lowering),
    'torch': torch_step(variant, kind, batch, size),
  }
  if before:
    steps_of['before'] = jax_step(name, options, kind, batch, size, before)
  for fn in steps_of.values():  # compile / warm up
    fn()
    fn()
  times = {k: [] for k in steps_of}
  for _ in range(rounds):
    for k, fn in steps_of.items():
      times[k].append(_seconds_per_step(fn, n_steps))
  ours_ips = batch / float(np.median(times['ours']))
  torch_ips = batch / float(np.median(times['torch']))
  extra = {}
  if before:
    before_ips = batch / float(np.median(times['before']))
    extra = {
      'before_lowering': before,
      'before_img_s': before_ips,
      'before_ratio': before_ips / torch_ips,
      'speedup': ours_ips / before_ips,
      'before_step_s': times['before'],
    }
  return extra | {
    'model': variant,
    'loss': kind,
    'batch': batch,
    'image_size': size,
    'conv_lowering': lowering,
    'ours_img_s': ours_ips,
    'torch_img_s': torch_ips,
    'ratio': ours_ips / torch_ips,
    'ours_step_s': times['ours'],
    'torch_step_s': times['torch'],
  }


def main(argv):
  del argv
  import torch  # pylint: disable=import-outside-toplevel

  machine = common.machine_info() | {
    'torch': torch.__version__,
    'torch_threads': torch.get_num_threads(),
  }
  print(f'# {machine}')
  print(
    f'{"model":24} {"loss":5} {"ours img/s":>10} {"torch img/s":>11} {"ours/torch":>10}'
    + (f' {"before img/s":>12} {"before/torch":>12} {"speed-up":>8}' if _BEFORE.value else '')
  )
  rows = []
  for variant in _MODELS.value:
    for kind in _LOSSES.value:
      r = compare(
        variant,
        kind,
        _BATCH.value,
        _SIZE.value,
        _STEPS.value,
        _ROUNDS.value,
        _LOWERING.value,
        _BEFORE.value,
      )
      rows.append(r)
      print(
        f'{variant:24} {kind:5} {r["ours_img_s"]:10.1f} {r["torch_img_s"]:11.1f} '
        f'{r["ratio"]:10.2f}'
        + (
          f' {r["before_img_s"]:12.1f} {r["before_ratio"]:12.2f} {r["speedup"]:8.2f}'
          if _BEFORE.value
          else ''
        ),
        flush=True,
      )
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value, 'w', encoding='utf-8') as f:
    json.dump(
      {'machine': machine, 'steps': _STEPS.value, 'rounds': _ROUNDS.value, 'results': rows},
      f,
      indent=2,
    )
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
