"""Training and evaluation throughput of every model at 28x28 and 112x112, and the share of
a streamed image folder's input pipeline in a ResNet18 step.

Times the library's own jitted train and eval steps (`bcam_jax.steps`) on uint8 batches
gathered from an in-memory array, exactly as `train.py` feeds them, and measures how long
the input side (index shuffle + gather + transfer to the devices) takes per step next to
the step itself. Prints a table and writes JSON.

With --stream_sizes, it also writes an RGB image folder of --stream_images JPEGs
(256 x 256) to a temporary directory and, per size, streams it (`data.load_streamed_folder`:
decoded, resized and centre-cropped by worker threads) into the ResNet18 (ImageNet stem)
train step of configs/image_folder.py, timing, per batch: the loader alone (fetch + decode
of a batch by its --stream_workers threads, nothing else running), the train step alone (on
a batch already in memory) and the two together as train.py runs them
(`data.train_batches` reading ahead while the step runs), the last two interleaved step by
step (medians). The input share is the time the end-to-end step spends beyond the step
alone; loader/step is the loader's own time per batch over the step's.

  python bench/throughput.py                       # all models, 28 and 112
  python bench/throughput.py --models=resnet18 --sizes=28 --steps=20
  python bench/throughput.py --models= --stream_sizes=112,224   # the streamed folder only
"""

import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from PIL import Image  # noqa: E402

from bcam_jax import data, models, optim, parallel, steps  # noqa: E402
from bcam_jax import objective as objective_lib  # noqa: E402
from bcam_jax.configs import base  # noqa: E402
from bench import common  # noqa: E402

_MODELS = flags.DEFINE_list('models', list(models.MODEL_NAMES), 'Models to time.')
_SIZES = flags.DEFINE_list('sizes', ['28', '112'], 'Image sizes.')
_BATCH = flags.DEFINE_list('batch_sizes', ['128', '32'], 'Global batch per image size.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per measurement (after 2 warm-up).')
_OUT = flags.DEFINE_string('out', 'bench/results/throughput.json', 'JSON output path.')
_STREAM_SIZES = flags.DEFINE_list(
  'stream_sizes', [], 'Image sizes of the streamed-folder measurement (e.g. 112,224).'
)
_STREAM_BATCH = flags.DEFINE_integer('stream_batch', 32, 'Batch of the streamed measurement.')
_STREAM_IMAGES = flags.DEFINE_integer('stream_images', 320, 'JPEGs in the streamed folder.')
_STREAM_STEPS = flags.DEFINE_integer(
  'stream_steps', 4, 'Timed streamed rounds (after 1 warm-up step).'
)
_STREAM_WORKERS = flags.DEFINE_integer('stream_workers', 0, 'Decoding threads (0: one per CPU).')

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


def write_jpeg_folder(root: str, n_images: int, side: int = 256, classes: int = 4) -> str:
  """An RGB ImageFolder of `n_images` side x side JPEGs (quality 90): smooth colour
  gradients plus noise, so they decode like photographs rather than flat or pure noise."""
  rng = np.random.default_rng(0)
  ramp = np.linspace(0, 1, side)
  for k in range(n_images):
    split, label = 'test' if (k // classes) % 8 == 0 else 'train', k % classes
    directory = os.path.join(root, split, f'class{label}')
    os.makedirs(directory, exist_ok=True)
    colour = rng.random(3)
    image = 200 * colour * ramp[:, None, None] * ramp[None, :, None]
    image = np.clip(image + rng.normal(0, 20, (side, side, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(os.path.join(directory, f'{k}.jpg'), quality=90)
  return root


def measure_streamed(root: str, size: int, batch: int, n_steps: int, workers: int) -> dict:
  """Per-batch seconds of the loader alone, the ResNet18 train step alone and both together
  for the folder `root` streamed at `size` (see the module docstring)."""
  mesh = parallel.make_mesh()
  folder = data.load_streamed_folder(root, size, channels=3, workers=workers)
  split = folder.splits['train']
  model = models.get_model('resnet18', folder.num_classes, stem='imagenet')
  config = base.get_base_config()
  tx, schedule = optim.make_optimizer(config.optimizer, total_steps=1000)
  init = steps.make_init_fn(model, tx, seed=0, image_size=size, channels=3)
  state = jax.jit(init, out_shardings=parallel.replicated(mesh))()
  objective = objective_lib.Objective(
    kind='ce', num_classes=folder.num_classes, prototype_size=size
  )
  info = data.DatasetInfo('folder', folder.num_classes, folder.mean, folder.std, (), 3)
  train_step = jax.jit(
    common.train_step_fn(model, tx, schedule, objective, info, size),
    out_shardings=parallel.replicated(mesh),
    donate_argnums=0,
  )
  prototypes = jax.device_put(
    np.zeros((folder.num_classes, size, size), np.float32), parallel.replicated(mesh)
  )
  holder = {'state': state}

  def run_step(images, labels):
    holder['state'], metrics = train_step(
      holder['state'], *parallel.shard_batch(mesh, images, labels), prototypes
    )
    jax.block_until_ready(metrics)

  per_epoch = len(split) // batch

  def loader(start, stop):
    return data.train_batches(split, batch, 0, start, stop)

  x, y = next(iter(loader(0, 1)))
  run_step(x, y)  # compile and warm up
  # The loader alone: every batch fetched and decoded while nothing else runs.
  start = time.perf_counter()
  for _ in loader(0, n_steps):
    pass
  loader_s = (time.perf_counter() - start) / n_steps
  # The step alone and the step fed by the loader (reading ahead, in another epoch so that
  # no batch is served twice), interleaved: on a shared machine both see the same load.
  # Medians of the rounds.
  batches = iter(loader(per_epoch, per_epoch + n_steps))
  alone, fed = [], []
  for _ in range(n_steps):
    start = time.perf_counter()
    run_step(x, y)
    alone.append(time.perf_counter() - start)
    start = time.perf_counter()
    run_step(*next(batches))
    fed.append(time.perf_counter() - start)
  step_s, end_to_end_s = float(np.median(alone)), float(np.median(fed))
  return {
    'image_size': size,
    'batch': batch,
    'workers': split.images.workers,
    'train_images': len(split),
    'loader_ms': 1e3 * loader_s,
    'train_step_ms': 1e3 * step_s,
    'end_to_end_ms': 1e3 * end_to_end_s,
    'loader_per_step': loader_s / step_s,
    'input_share': max(0.0, end_to_end_s - step_s) / end_to_end_s,
  }


def streamed_rows(sizes, batch, n_images, n_steps, workers) -> list[dict]:
  """`measure_streamed` at each size on one temporary folder, printed as a table."""
  rows = []
  print(
    f'\n# streamed RGB folder ({n_images} JPEGs 256x256), ResNet18 (ImageNet stem), batch {batch}'
  )
  print(
    f'{"size":>4} {"workers":>7} {"loader ms":>9} {"step ms":>8} {"e2e ms":>8} '
    f'{"loader/step %":>13} {"input share %":>13}'
  )
  with tempfile.TemporaryDirectory() as root:
    write_jpeg_folder(root, n_images)
    for size in sizes:
      r = measure_streamed(root, size, batch, n_steps, workers or data.streaming.default_workers())
      rows.append(r)
      print(
        f'{size:4d} {r["workers"]:7d} {r["loader_ms"]:9.1f} {r["train_step_ms"]:8.1f} '
        f'{r["end_to_end_ms"]:8.1f} {100 * r["loader_per_step"]:13.2f} '
        f'{100 * r["input_share"]:13.2f}',
        flush=True,
      )
  return rows


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
  report = {'machine': machine, 'steps': _STEPS.value, 'results': rows}
  if _STREAM_SIZES.value:
    report['streamed'] = streamed_rows(
      [int(v) for v in _STREAM_SIZES.value],
      _STREAM_BATCH.value,
      _STREAM_IMAGES.value,
      _STREAM_STEPS.value,
      _STREAM_WORKERS.value,
    )
    report['stream_steps'] = _STREAM_STEPS.value
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value, 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
