"""How far apart runs that differ only in rounding end up, step by step.

A 1-device and an 8-device run of the same config compute the same sums in a different
order (BatchNorm statistics, the loss, the gradient all-reduce), so they differ by float
rounding after one step. Whether that stays at rounding level over a run depends on the run
itself: this script measures it, to choose how the cross-mesh tests compare (tests/numerics.py).
Per step it prints the normwise relative difference (max over leaves of
max|a - b| / max|b|) of the parameters of:

* `1 vs 8 devices`: two whole runs, on one device and on eight (fake CPU devices);
* `perturbed start`: the one-device run against itself started from parameters multiplied
  by (1 + 1e-7 N(0, 1)), float32 rounding noise: the run's own amplification, which does
  not depend on the processor;
* `xla lowering`: the one-device run against the same run with conv_lowering='xla';
* `one step, 1 vs 8`: the update (new - old parameters) and the new BatchNorm statistics of
  one step taken from the same state on one and on eight devices, what
  `tests/test_train.py` compares: this never compounds.

  python bench/mesh_drift.py                                  # ResNet18 width 8, BCPL
  python bench/mesh_drift.py --dtype=float64                  # what tests/test_train.py runs
  python bench/mesh_drift.py --model=simple_cnn --steps=24 --learning_rate=0.05
"""

import os
import sys
import tempfile

import jax

jax.config.update('jax_num_cpu_devices', 8)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bcam_jax import data, io_utils, parallel, run_setup  # noqa: E402
from bcam_jax.configs import experiment  # noqa: E402
from bcam_jax.run_spec import RunSpec  # noqa: E402
from bench import common  # noqa: E402
from tests import numerics, synthetic  # noqa: E402

_MODEL = flags.DEFINE_enum('model', 'resnet18', ['resnet18', 'simple_cnn'], 'Model.')
_WIDTH = flags.DEFINE_integer('width', 8, 'ResNet18 width (the tests use 8).')
_LOSS = flags.DEFINE_enum('loss', 'bcpl', ['ce', 'proto', 'bcpl'], 'config.loss.kind.')
_STEPS = flags.DEFINE_integer('steps', 6, 'Train steps.')
_LR = flags.DEFINE_float('learning_rate', None, "Peak learning rate (default: the config's).")
_WARMUP = flags.DEFINE_integer('warmup_steps', 3, 'config.optimizer.warmup_steps.')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Global batch.')
_PERTURBATION = flags.DEFINE_float('perturbation', 1e-7, 'Relative noise on the start.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'float64'], 'config.train.dtype.')
_OUT = flags.DEFINE_string(
  'out', None, 'JSON path (default bench/results/mesh_drift_<model>_<dtype>.json).'
)


def make_config(idx_dir: str):
  """The tiny config of tests/test_train.py's cross-mesh test, with this script's flags."""
  config = experiment.get_config(f'model={_MODEL.value}')
  if _MODEL.value == 'resnet18':
    config.model.options.width = _WIDTH.value
  config.data.source, config.data.idx_dir, config.data.val_size = 'idx', idx_dir, 40
  config.train.batch_size, config.train.num_steps = _BATCH.value, _STEPS.value
  config.optimizer.warmup_steps = _WARMUP.value
  if _LR.value is not None:
    config.optimizer.learning_rate = _LR.value
  config.loss.kind = _LOSS.value
  config.train.dtype = _DTYPE.value
  return config


class Runner:
  """One config's train step on a mesh, from host states to host states."""

  def __init__(self, config, devices, workdir):
    self.run = run_setup.setup_run(RunSpec.from_config(config), devices)
    self.tx, schedule = self.run.optimizer(config.train.num_steps)
    self.step_fn = self.run.train_step(self.tx, schedule)
    self.prototypes = self.run.prototypes(workdir)['train']
    self.config = config

  def initial_state(self):
    return jax.device_get(self.run.state_spec.initial(self.tx))

  def step(self, host_state, step):
    train = self.run.datasets.train
    idx = data.train_batch_indices(len(train), self.config.train.batch_size, self.config.seed, step)
    images, labels = parallel.shard_batch(self.run.mesh, train.images[idx], train.labels[idx])
    state = jax.device_put(host_state, parallel.replicated(self.run.mesh))
    return jax.device_get(self.step_fn(state, images, labels, self.prototypes)[0])

  def trajectory(self, state, num_steps):
    states = []
    for step in range(num_steps):
      state = self.step(state, step)
      states.append(state)
    return states


def perturbed(state, scale: float, seed: int = 0):
  rng = np.random.default_rng(seed)
  noisy = lambda p: (p * (1 + scale * rng.standard_normal(p.shape))).astype(p.dtype)
  return state.replace(params=jax.tree.map(noisy, state.params))


def update(new, old):
  return jax.tree.map(lambda a, b: a - b, new.params, old.params)


def main(_):
  num_steps = _STEPS.value
  jax.config.update('jax_enable_x64', _DTYPE.value == 'float64')
  with tempfile.TemporaryDirectory() as tmp:
    config = make_config(synthetic.write_dataset(os.path.join(tmp, 'idx')))
    one = Runner(config, jax.devices()[:1], tmp)
    eight = Runner(config, jax.devices()[:8], tmp)
    xla_config = make_config(config.data.idx_dir)
    xla_config.model.conv_lowering = 'xla'
    xla = Runner(xla_config, jax.devices()[:1], tmp)
    start = one.initial_state()
    runs = {
      'one': one.trajectory(start, num_steps),
      'eight': eight.trajectory(start, num_steps),
      'perturbed': one.trajectory(perturbed(start, _PERTURBATION.value), num_steps),
      'xla': xla.trajectory(start, num_steps),
    }
  rows = []
  before = start
  for s in range(num_steps):
    after_one = runs['one'][s]
    after_eight = eight.step(before, s)  # from the one-device run's state
    rows.append(
      {
        'step': s + 1,
        'whole_1_vs_8': numerics.relative_difference(runs['eight'][s].params, after_one.params),
        'perturbed_start': numerics.relative_difference(
          runs['perturbed'][s].params, after_one.params
        ),
        'xla_lowering': numerics.relative_difference(runs['xla'][s].params, after_one.params),
        'one_step_update_1_vs_8': numerics.relative_difference(
          update(after_eight, before), update(after_one, before)
        ),
        'one_step_batch_stats_1_vs_8': numerics.relative_difference(
          after_eight.batch_stats, after_one.batch_stats
        ),
      }
    )
    before = after_one
  label = (
    f'{_MODEL.value}'
    + (f' width {_WIDTH.value}' if _MODEL.value == 'resnet18' else '')
    + f', {_DTYPE.value}, {_LOSS.value}, batch {_BATCH.value}, '
    f'lr {config.optimizer.learning_rate} '
    f'({_WARMUP.value} warm-up steps), perturbation {_PERTURBATION.value:g}'
  )
  print(f'Normwise relative parameter differences, {label}:')
  print(
    '| step | whole runs 1 vs 8 devices | perturbed start | xla lowering '
    '| one step 1 vs 8: update | one step 1 vs 8: BatchNorm stats |'
  )
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(
      f'| {r["step"]} | {r["whole_1_vs_8"]:.1e} | {r["perturbed_start"]:.1e} | '
      f'{r["xla_lowering"]:.1e} | {r["one_step_update_1_vs_8"]:.1e} | '
      f'{r["one_step_batch_stats_1_vs_8"]:.1e} |'
    )
  out = _OUT.value or f'bench/results/mesh_drift_{_MODEL.value}_{_DTYPE.value}.json'
  io_utils.write_json(out, {'machine': common.machine_info(), 'config': label, 'rows': rows})
  print(f'Wrote {out}')


if __name__ == '__main__':
  app.run(main)
