"""Data-parallel training with validation, checkpoints and resume: `train_and_evaluate`.

One code path for one CPU, one GPU or every device of a host: the train state is
replicated and donated, batches are sharded over the mesh's `data` axis, and the batch
order is a pure function of (seed, step), so a run killed at any moment and restarted from
its latest checkpoint ends with exactly the parameters of an uninterrupted run.
"""

import dataclasses
import itertools
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from bcam_jax import (
  conditions,
  data,
  explanations,
  io_utils,
  losses,
  models,
  optim,
  parallel,
  steps,
  workdir_lock,
)
from bcam_jax.checkpointing import Checkpoints
from bcam_jax.config_validation import ConfigError, check_matches_workdir, validate_config
from bcam_jax.metric_logging import MetricLogger, format_duration
from bcam_jax.report import figures


def conv_lowering(config: ml_collections.ConfigDict) -> str:
  """config.model.conv_lowering, "auto" for configs written before it existed."""
  return config.model.get('conv_lowering', 'auto')


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite; the run stops without saving."""


@dataclasses.dataclass
class RunSetup:
  """What training and evaluation of one config share."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  datasets: data.Datasets
  model: Any
  dtype: Any
  eval_batch_size: int
  objective: steps.Objective

  def eval_step(self):
    info = self.datasets.info
    return jax.jit(
      steps.make_eval_step(
        self.model, self.objective, mean=info.mean, std=info.std, dtype=self.dtype
      ),
      out_shardings=parallel.replicated(self.mesh),
    )

  def train_step(self, tx, schedule):
    """The jitted train step (`steps.make_train_step`) with a replicated output; it donates
    the state it is given."""
    info = self.datasets.info
    return jax.jit(
      steps.make_train_step(
        self.model,
        tx,
        schedule,
        self.objective,
        mean=info.mean,
        std=info.std,
        dtype=self.dtype,
        seed=self.config.seed,
        frozen_backbone=self.frozen_backbone,
      ),
      out_shardings=parallel.replicated(self.mesh),
      donate_argnums=0,
    )

  def prototypes(self, workdir: str) -> dict[str, jax.Array]:
    """Train and validation class prototypes (cached in `workdir`), replicated."""
    protos = data.load_or_compute_prototypes(
      workdir, self.datasets, self.config.data.image_size, write=jax.process_index() == 0
    )
    return {k: parallel.replicate(self.mesh, v) for k, v in protos.items()}

  @property
  def frozen_backbone(self) -> bool:
    """CA-Stream's protocol: only the stream trains."""
    return bool(self.config.model.ca_stream.freeze_backbone)

  def optimizer(self, total_steps: int):
    """(tx, schedule) of `config.optimizer`; with a frozen backbone, tx updates the
    CA-Stream parameters only."""
    tx, schedule = optim.make_optimizer(self.config.optimizer, total_steps)
    if self.frozen_backbone:
      tx = optim.train_only(tx, ('stream',))
    return tx, schedule

  def init_from_baseline(self, state: steps.TrainState) -> steps.TrainState:
    """`state` with backbone, classifier and BatchNorm statistics of the best checkpoint
    of `config.init_from` (a run of the same model with the default head and pooling)."""
    cfg = self.config
    baseline = models.get_model(
      cfg.model.name,
      self.datasets.info.num_classes,
      dtype=self.dtype,
      conv_lowering=conv_lowering(cfg),
      **cfg.model.options,
    )
    init = steps.make_init_fn(baseline, optax.identity(), cfg.seed, cfg.data.image_size)
    abstract = self._replicated_shapes(lambda: init().model_variables())
    ckpts = Checkpoints(cfg.init_from)
    try:
      restored, step = ckpts.restore_best(abstract)
    finally:
      ckpts.close()
    params = dict(state.params)
    for name in ('backbone_net', 'head_net'):
      want = jax.tree.map(lambda p: p.shape, params[name])
      got = jax.tree.map(lambda p: p.shape, restored['params'][name])
      if want != got:
        raise ConfigError(
          f'config.init_from={cfg.init_from!r}: its {name} parameters do not '
          f'fit this model ({cfg.model.name}, head={cfg.model.head!r}, '
          f"pooling={cfg.model.pooling!r}); e.g. simple_cnn's flatten + dense "
          'classifier cannot take pooled features.'
        )
      params[name] = restored['params'][name]
    logging.info(
      'Initialised backbone and classifier from %s (best checkpoint, step %d).', cfg.init_from, step
    )
    return state.replace(params=params, batch_stats=restored.get('batch_stats', {}))

  def init_state(self, tx) -> steps.TrainState:
    """The initial train state, replicated over the mesh."""
    init = steps.make_init_fn(self.model, tx, self.config.seed, self.config.data.image_size)
    return jax.jit(init, out_shardings=parallel.replicated(self.mesh))()

  def abstract_state(self, tx) -> steps.TrainState:
    """Shapes, dtypes and shardings of the train state, without computing it: the
    target layout of a checkpoint restore."""
    return self._replicated_shapes(lambda: self.init_state(tx))

  def _replicated_shapes(self, fn):
    """ShapeDtypeStructs, replicated over the mesh, of what `fn()` would return."""
    sharding = parallel.replicated(self.mesh)
    return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), jax.eval_shape(fn)
    )


def setup_run(
  config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> RunSetup:
  """Validates the config, builds the mesh, loads the data and builds the model."""
  validate_config(config)
  mesh = parallel.make_mesh(devices)
  try:
    parallel.check_divisible(config.train.batch_size, mesh, 'config.train.batch_size')
  except ValueError as error:
    raise ConfigError(str(error)) from None
  n_dev = mesh.devices.size
  datasets = data.load_datasets(config.data)
  if config.train.batch_size > len(datasets.train):
    raise ConfigError(
      f'config.train.batch_size={config.train.batch_size} is larger than the '
      f'train split ({len(datasets.train)} images).'
    )
  # No larger than the largest split to evaluate (padding beyond it is wasted memory), and
  # a multiple of the device count.
  largest = max(len(datasets.val), len(datasets.test))
  eval_batch_size = min(config.eval.batch_size, largest)
  eval_batch_size = -(-eval_batch_size // n_dev) * n_dev
  if eval_batch_size != config.eval.batch_size:
    logging.info(
      'Evaluating in batches of %d (config.eval.batch_size=%d, %d device(s), largest split %d).',
      eval_batch_size,
      config.eval.batch_size,
      n_dev,
      largest,
    )
  dtype = jnp.dtype(config.train.dtype)
  try:
    model = models.get_model(
      config.model.name,
      datasets.info.num_classes,
      dtype=dtype,
      head=config.model.head,
      pooling=config.model.pooling,
      conv_lowering=conv_lowering(config),
      **config.model.options,
    )
  except ValueError as error:  # an unknown or invalid config.model.options entry
    raise ConfigError(f'config.model.options={dict(config.model.options)!r}: {error}') from None
  _check_cam_side(config, model)
  cam = models.cam_shape(model, config.data.image_size)
  logging.info(
    'Model %s at %dx%d: CAM layer %s; %d device(s) of %s; data from %s',
    config.model.name,
    config.data.image_size,
    config.data.image_size,
    cam,
    n_dev,
    jax.devices()[0].platform,
    datasets.source,
  )
  objective = steps.Objective.from_config(config, datasets.info.num_classes)
  return RunSetup(config, mesh, datasets, model, dtype, eval_batch_size, objective)


def _check_cam_side(config: ml_collections.ConfigDict, model) -> None:
  """Every model needs at least a 1x1 CAM map. A CAM loss compares maps with the class
  prototypes: a 1x1 map has nothing to compare (min-max scaling makes it 0) and its loss
  ends in NaN, so it needs at least 2x2."""
  side = model.cam_side(config.data.image_size)
  if side < 1:
    raise ConfigError(
      f'config.data.image_size={config.data.image_size} is too small for '
      f'{model.label()}: it needs image_size >= {model.min_image_side()}.'
    )
  if config.loss.kind != 'ce' and 1 <= side < 2:
    need = next(s for s in itertools.count(config.data.image_size) if model.cam_side(s) >= 2)
    raise ConfigError(
      f'config.data.image_size={config.data.image_size} gives {model.label()} a {side}x'
      f'{side} CAM map; config.loss.kind={config.loss.kind!r} compares CAM maps with the '
      f'class prototypes and needs at least 2x2: image_size >= {need}.'
    )


def evaluate(
  run: RunSetup, eval_step, variables, split: data.Split, prototypes: jax.Array
) -> tuple[dict[str, float], np.ndarray]:
  """Metrics over a whole split, each example counted exactly once, and the split's
  class CAMs `(C, S, S)` in [0, 1].

  loss (CE) and accuracy; proto_loss, the mean per-image Prototype Loss; bcam_loss, the
  Batch-CAM Prototype Loss of the class-averaged CAMs of the whole split; cam, the term of
  the training objective (one of those two, 0 for 'ce'); total, the objective.
  """
  totals = None
  for images, labels, mask in data.eval_batches(split, run.eval_batch_size):
    sums = eval_step(variables, *parallel.shard_batch(run.mesh, images, labels, mask), prototypes)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  objective = run.objective
  counts = totals['class_count']
  maps_from_sums = explanations.explanation_type(run.model).maps_from_sums
  class_cams = objective.compare(maps_from_sums(totals['class_sums'], counts))
  bcam = losses.batch_cam_loss(class_cams, counts, prototypes, objective.metric)
  count = float(totals['count'])
  metrics = {
    'loss': float(totals['loss_sum']) / count,
    'accuracy': float(totals['correct']) / count,
    'count': count,
    'proto_loss': float(totals['proto_sum']) / count,
    'bcam_loss': float(bcam),
  }
  metrics['cam'] = {'ce': 0.0, 'proto': metrics['proto_loss'], 'bcpl': metrics['bcam_loss']}[
    objective.kind
  ]
  metrics['total'] = float(objective.total(metrics['loss'], metrics['cam']))
  return metrics, np.asarray(class_cams)


def _check_finite(step: int, metrics: dict[str, float], ckpts: Checkpoints) -> None:
  if not (np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])):
    ckpts.wait()
    what = 'training loss' if not np.isfinite(metrics['loss']) else 'gradient norm'
    last = ckpts.latest_step()
    kept = (
      f'The last good checkpoint (step {last}) is kept in {ckpts.latest.directory}.'
      if last is not None
      else 'No checkpoint had been saved yet.'
    )
    raise NonFiniteLossError(
      f'Non-finite {what} at step {step} (loss={metrics["loss"]}, '
      f'grad_norm={metrics["grad_norm"]}); stopping without saving. {kept} '
      'Lower config.optimizer.learning_rate or set config.optimizer.grad_clip_norm.'
    )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, devices: Sequence[jax.Device] | None = None
) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and tests it.

  Holds the workdir's lock (`workdir_lock`) throughout: a second run on the same workdir
  fails at once. Returns the final summary, also written to `<workdir>/results.json`.
  """
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock.locked(workdir):
    return _train_and_evaluate(config, workdir, devices)


def _train_and_evaluate(config, workdir, devices) -> dict[str, Any]:
  run = setup_run(config, devices)  # validates the config
  check_matches_workdir(config, workdir)  # before anything is written there
  is_writer = jax.process_index() == 0
  if is_writer:
    io_utils.remove_stale_temporaries(workdir)
    io_utils.write_json(os.path.join(workdir, 'config.json'), json.loads(config.to_json()))
  ds, info, tc = run.datasets, run.datasets.info, config.train
  prototypes = run.prototypes(workdir)

  n_train, batch = len(ds.train), tc.batch_size
  rows = parallel.process_rows(run.mesh, batch)  # this process's part of every batch
  steps_per_epoch = data.steps_per_epoch(n_train, batch)
  total_steps = tc.num_steps if tc.num_steps > 0 else tc.num_epochs * steps_per_epoch
  eval_every = tc.eval_every_steps or steps_per_epoch
  tx, schedule = run.optimizer(total_steps)

  ckpts = Checkpoints(workdir, keep=tc.keep_checkpoints)
  logger = None
  try:
    state = ckpts.restore_latest(run.abstract_state(tx))
    resumed = state is not None
    if not resumed:
      state = run.init_state(tx)
      if config.init_from:
        state = run.init_from_baseline(state)
    start_step = int(state.step)
    if start_step > total_steps:
      raise ConfigError(
        f'the checkpoint in {workdir} is at step {start_step}, beyond this '
        f"config's {total_steps} steps (config.train.num_steps / num_epochs): "
        'use a new --workdir or more steps.'
      )
    logger = MetricLogger(workdir, enabled=is_writer, resumed_step=start_step)
    if resumed:
      logger.info(f'Resumed from {ckpts.latest.directory} at step {start_step}.')

    train_step = run.train_step(tx, schedule)
    eval_step = run.eval_step()
    logger.info(
      f'Training {config.model.name} on {info.name} with loss '
      f'{conditions.loss_formula(config.loss)}: {total_steps} steps ({steps_per_epoch} per '
      f'epoch, global batch {batch}) from step {start_step}.'
    )

    window = _empty_window()
    t_start = t_window = time.time()
    steps_done_at_start = start_step
    pending = None  # (step, device metrics) of the step before, checked one step late
    for step in range(start_step, total_steps):
      idx = data.train_batch_indices(n_train, batch, config.seed, step)[rows]
      images, labels = parallel.shard_local(
        run.mesh, batch, ds.train.images[idx], ds.train.labels[idx]
      )
      state, metrics = train_step(state, images, labels, prototypes['train'])
      if pending is not None:
        _accumulate(window, _check_pending(pending, ckpts))
      pending = (step, metrics)
      done = step + 1
      boundary = (
        done % tc.log_every_steps == 0,
        done % eval_every == 0,
        done % tc.checkpoint_every_steps == 0,
        done == total_steps,
      )
      if not any(boundary):
        continue
      _accumulate(window, _check_pending(pending, ckpts))
      pending = None
      if boundary[0] or boundary[3]:
        now = time.time()
        img_s = window['n'] * batch / max(now - t_window, 1e-9)
        rate = (done - steps_done_at_start) / max(now - t_start, 1e-9)
        train_metrics = {k: window[k] / window['n'] for k in _WINDOWED}
        train_metrics.update(learning_rate=float(metrics['learning_rate']), images_per_second=img_s)
        logger.write(done, 'train', train_metrics)
        logger.info(
          f'step {done}/{total_steps} epoch {step // steps_per_epoch + 1}/'
          f'{-(-total_steps // steps_per_epoch)} | loss {train_metrics["loss"]:.4f} '
          f'(ce {train_metrics["ce"]:.4f} cam {train_metrics["cam"]:.4f}) '
          f'acc {100 * train_metrics["accuracy"]:.2f}% | lr {train_metrics["learning_rate"]:.3g}'
          f' | {img_s:.0f} img/s | ETA {format_duration((total_steps - done) / rate)}'
        )
        window = _empty_window()
        t_window = now
      t_pause = time.time()  # evaluation and saving do not count towards img/s
      if boundary[1] or boundary[3]:
        val, class_cams = evaluate(
          run, eval_step, state.model_variables(), ds.val, prototypes['val']
        )
        logger.write(done, 'val', val)
        logger.write_image(
          done,
          'val/class_cams_vs_prototypes',
          figures.cams_next_to_prototypes(class_cams, prototypes['val']),
        )
        logger.info(
          f'step {done} validation: loss {val["loss"]:.4f} '
          f'accuracy {100 * val["accuracy"]:.2f}% | prototype loss '
          f'{val["proto_loss"]:.4f} Batch-CAM loss {val["bcam_loss"]:.4f} '
          f'({run.objective.metric})'
        )
        ckpts.save_best(done, state.model_variables(), val['accuracy'])
      if boundary[2] or boundary[3]:
        ckpts.save(done, state)
      t_window += time.time() - t_pause

    test, _ = evaluate(run, eval_step, state.model_variables(), ds.test, prototypes['train'])
    logger.write(int(state.step), 'test', test)
    logger.info(
      f'test (final parameters): loss {test["loss"]:.4f} accuracy {100 * test["accuracy"]:.2f}%'
    )
    ckpts.wait()
    best_step = ckpts.best.best_step()
    summary = {
      'step': int(state.step),
      'test_loss': test['loss'],
      'test_accuracy': test['accuracy'],
      'test_proto_loss': test['proto_loss'],
      'test_bcam_loss': test['bcam_loss'],
      'best_checkpoint_step': best_step,
      'train_seconds_this_session': time.time() - t_start,
      'num_devices': int(run.mesh.devices.size),
      'num_processes': jax.process_count(),
      'data_source': ds.source,
    }
    if is_writer:
      io_utils.write_json(os.path.join(workdir, 'results.json'), summary)
    return summary | {'state': state}
  finally:
    ckpts.wait()
    ckpts.close()
    if logger is not None:
      logger.close()


def _check_pending(pending, ckpts: Checkpoints) -> dict[str, float]:
  step, device_metrics = pending
  host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
  _check_finite(step, host, ckpts)
  return host


_WINDOWED = ('loss', 'ce', 'cam', 'penalty', 'accuracy')


def _empty_window() -> dict[str, float]:
  return dict.fromkeys(_WINDOWED + ('n',), 0.0)


def _accumulate(window: dict, metrics: dict[str, float]) -> None:
  for k in _WINDOWED:
    window[k] += metrics[k]
  window['n'] += 1
