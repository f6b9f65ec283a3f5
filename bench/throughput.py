"""Training and evaluation throughput of every model at 28x28 and 112x112.

Times the library's own jitted train and eval steps (`bcam_jax.steps`) on uint8 batches
gathered from an in-memory array, exactly as `train.py` feeds them, and measures how long
the input side (index shuffle + gather + transfer to the devices) takes per step next to
the step itself. Prints a table and writes JSON.

  python bench/throughput.py                       # all models, 28 and 112
  python bench/throughput.py --models=resnet18 --sizes=28 --steps=20
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bcam_jax import data, models, optim, parallel, steps  # noqa: E402
from bcam_jax import objective as objective_lib  # noqa: E402
from bcam_jax.configs import base  # noqa: E402
from bench import common  # noqa: E402

_MODELS = flags.DEFINE_list('models', list(models.MODEL_NAMES), 'Models to time.')
_SIZES = flags.DEFINE_list('sizes', ['28', '112'], 'Image sizes.')
_BATCH = flags.DEFINE_list('batch_sizes', ['128', '32'], 'Global batch per image size.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per measurement (after 2 warm-up).')
_OUT = flags.DEFINE_string('out', 'bench/results/throughput.json', 'JSON output path.')

# At 112x112 ConvNeXt uses its ImageNet patchify stem, as its config docstring advises.
_OPTIONS = {('convnext_v2_tiny', 112): {'stem_stride': 4}}


def _time_loop(fn, n):
  """Seconds per call of `fn` (which blocks on its result), over `n` calls."""
  start = time.perf_counter()
  for _ in range(n):
    fn()
  return (time.perf_counter() - start) / n


def measure(name: str, size: int, batch: int, n_steps: int) -> dict:
  mesh = parallel.make_mesh()
  info = data.dataset_info('mnist')
  model = models.get_model(name, info.num_classes, **_OPTIONS.get((name, size), {}))
  config = base.get_base_config()
  tx, schedule = optim.make_optimizer(config.optimizer, total_steps=1000)
  init = steps.make_init_fn(model, tx, seed=0, image_size=size)
  state = jax.jit(init, out_shardings=parallel.replicated(mesh))()
  objective = objective_lib.Objective(kind='ce', prototype_size=size)
  train_step = jax.jit(
    common.train_step_fn(model, tx, schedule, objective, info, size),
    out_shardings=parallel.replicated(mesh),
    donate_argnums=0,
  )
  eval_step = jax.jit(
    steps.make_eval_step(
      model, objective, mean=info.mean, std=info.std, dtype=np.float32, image_size=size
    )
  )
  prototypes = jax.device_put(np.zeros((10, size, size), np.float32), parallel.replicated(mesh))
  rng = np.random.default_rng(0)
  n_pool = 60_000
  images = rng.integers(0, 256, size=(n_pool, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, size=n_pool).astype(np.int32)
  mask = np.ones(batch, bool)
  counter = iter(range(10**9))

  def next_batch():
    idx = data.train_batch_indices(n_pool, batch, 0, next(counter))
    batch_arrays = parallel.shard_batch(mesh, images[idx], labels[idx])
    jax.block_until_ready(batch_arrays)
    return batch_arrays

  x, y = next_batch()
  holder = {'state': state}

  def train():
    holder['state'], metrics = train_step(holder['state'], x, y, prototypes)
    jax.block_until_ready(metrics)

  (m,) = parallel.shard_batch(mesh, mask)
  for _ in range(2):  # compile and warm up
    train()
    next_batch()
  # A copy: the train step donates (deletes) the state's buffers.
  variables = jax.tree.map(jnp.copy, holder['state'].model_variables())

  def evaluate():
    jax.block_until_ready(eval_step(variables, prototypes, x, y, m))

  evaluate()
  data_s = _time_loop(next_batch, n_steps)
  train_s = _time_loop(train, n_steps)
  eval_s = _time_loop(evaluate, n_steps)
  return {
    'model': name,
    'image_size': size,
    'batch': batch,
    'cam_shape': list(models.cam_shape(model, size)),
    'params': models.param_count(state.params),
    'train_img_s': batch / train_s,
    'eval_img_s': batch / eval_s,
    'data_ms': 1e3 * data_s,
    'train_step_ms': 1e3 * train_s,
    'data_share': data_s / (data_s + train_s),
  }


def main(argv):
  del argv
  machine = common.machine_info()
  batch_for = dict(zip(_SIZES.value, _BATCH.value))
  rows = []
  header = (
    f'{"model":18} {"size":>4} {"batch":>5} {"CAM":>10} {"train img/s":>11} '
    f'{"eval img/s":>10} {"step ms":>8} {"data ms":>8} {"data %":>6}'
  )
  print(f'# {machine}')
  print(header)
  for size in map(int, _SIZES.value):
    for name in _MODELS.value:
      r = measure(name, size, int(batch_for[str(size)]), _STEPS.value)
      rows.append(r)
      cam = 'x'.join(map(str, r['cam_shape']))
      print(
        f'{name:18} {size:4d} {r["batch"]:5d} {cam:>10} {r["train_img_s"]:11.1f} '
        f'{r["eval_img_s"]:10.1f} {r["train_step_ms"]:8.1f} {r["data_ms"]:8.2f} '
        f'{100 * r["data_share"]:6.2f}',
        flush=True,
      )
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value, 'w', encoding='utf-8') as f:
    json.dump({'machine': machine, 'steps': _STEPS.value, 'results': rows}, f, indent=2)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
