"""Data-parallel training with validation, checkpoints and resume: `train_and_evaluate`.

One code path for one CPU, one GPU or every device of a host: the train state is
replicated and donated, batches are sharded over the mesh's `data` axis, and the batch
order is a pure function of (seed, step), so a run killed at any moment and restarted from
its latest checkpoint ends with exactly the parameters of an uninterrupted run.
"""

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from bcam_jax import conditions, data, io_utils, parallel, split_loop, workdir_lock
from bcam_jax.checkpointing import Checkpoints
from bcam_jax.config_validation import ConfigError, check_matches_workdir
from bcam_jax.metric_logging import (
  MetricLogger,
  format_duration,
  tensorboard_dir,
  tensorboard_hint,
)
from bcam_jax.report import figures
from bcam_jax.run_setup import setup_run
from bcam_jax.run_spec import RunSpec, TrainSpec
from bcam_jax.workdir_lock import WorkdirError


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite; the run stops without saving."""


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
  spec: RunSpec | ml_collections.ConfigDict,
  workdir: str,
  devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
  """Trains `spec` (a `RunSpec`, or a config from `bcam_jax.configs`, read once by
  `RunSpec.from_config`) in `workdir`, resuming from its latest checkpoint, and tests it.

  Holds the workdir's lock (`workdir_lock`) throughout: a second run on the same workdir
  fails at once. Returns the final summary, also written to `<workdir>/results.json`.
  """
  spec = RunSpec.of(spec)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir}: a file, not a directory; give a new or existing one.')
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  try:
    with workdir_lock.locked(workdir):
      return _train_and_evaluate(spec, workdir, devices)
  except BaseException:
    # A start that failed before training began leaves no workdir it created behind.
    if created and jax.process_index() == 0 and not _training_began(workdir):
      shutil.rmtree(workdir, ignore_errors=True)
    raise


def _training_began(workdir: str) -> bool:
  """Whether `workdir` holds anything of a run worth keeping: a checkpoint or metrics."""
  checkpoints = os.path.join(workdir, 'checkpoints')
  has_checkpoint = os.path.isdir(checkpoints) and bool(os.listdir(checkpoints))
  return has_checkpoint or os.path.exists(os.path.join(workdir, 'metrics.jsonl'))


@dataclasses.dataclass(frozen=True)
class Cadence:
  """How long a run is and when its periodic actions fall: log, validate (and offer the
  best checkpoint), save the train state; each every N steps and all three at the end."""

  total_steps: int
  steps_per_epoch: int
  log_every: int
  validate_every: int
  save_every: int

  @classmethod
  def of(cls, train: TrainSpec, num_train: int) -> 'Cadence':
    """The run's length: `train.num_steps` steps when > 0, else `num_epochs` passes
    over the training split (`steps_per_epoch` = ceil(num_train / batch_size)). The
    resolved length is written to `<workdir>/run.json` (`run_length`)."""
    per_epoch = data.steps_per_epoch(num_train, train.batch_size)
    total = train.num_steps
    return cls(
      total_steps=total if total > 0 else train.num_epochs * per_epoch,
      steps_per_epoch=per_epoch,
      log_every=train.log_every_steps,
      validate_every=train.eval_every_steps or per_epoch,
      save_every=train.checkpoint_every_steps,
    )

  def due(self, done: int, every: int) -> bool:
    """Whether the action every `every` steps runs after `done` steps."""
    return done == self.total_steps or done % every == 0

  def position(self, done: int) -> str:
    """'step 40/858 epoch 1/2' after `done` steps."""
    epochs = -(-self.total_steps // self.steps_per_epoch)
    epoch = (done - 1) // self.steps_per_epoch + 1
    return f'step {done}/{self.total_steps} epoch {epoch}/{epochs}'

  def run_length(self, train: TrainSpec, num_train: int) -> dict[str, Any]:
    """What run.json records: the effective length and where it came from (the config
    holds num_steps = 0 when num_epochs decides)."""
    return {
      'total_steps': self.total_steps,
      'steps_per_epoch': self.steps_per_epoch,
      'epochs': self.total_steps / self.steps_per_epoch,
      'set_by': 'train.num_steps' if train.num_steps > 0 else 'train.num_epochs',
      'global_batch_size': train.batch_size,
      'num_train_examples': num_train,
    }


def train_metric_keys(objective, model) -> tuple[str, ...]:
  """The train step's metrics worth logging under `objective`: loss (the objective) and
  accuracy, and its terms only when there are several, each only if it can be non-zero:
  ce, cam (the CAM term, not under 'ce') and penalty (Soft-CAM's ElasticNet, with a
  Soft-CAM head and a non-zero lambda). Under plain 'ce' the loss is the CE: one key."""
  terms = ()
  if objective.kind.has_cam_term:
    terms += ('cam',)
  if model.kind.evidence and (objective.lambda_l1 or objective.lambda_l2):
    terms += ('penalty',)
  return ('loss',) + (('ce',) + terms if terms else ()) + ('accuracy',)


class _Window:
  """Training metrics (`keys`) averaged since the last log line, and the images per
  second over the time spent training in that window (validation and saving are left
  out)."""

  def __init__(self, batch_size: int, keys: tuple[str, ...]):
    self.batch_size, self.keys = batch_size, keys
    self.reset(time.time())

  def reset(self, now: float) -> None:
    self.sums, self.n, self.start = dict.fromkeys(self.keys, 0.0), 0, now

  def add(self, metrics: dict[str, float]) -> None:
    for k in self.keys:
      self.sums[k] += metrics[k]
    self.n += 1

  def exclude(self, seconds: float) -> None:
    self.start += seconds

  def close(self, learning_rate: float) -> dict[str, float]:
    """The window's means, learning rate and images per second; starts a new window."""
    now = time.time()
    means = {k: v / self.n for k, v in self.sums.items()}
    means.update(
      learning_rate=learning_rate,
      images_per_second=self.n * self.batch_size / max(now - self.start, 1e-9),
    )
    self.reset(now)
    return means


def _train_and_evaluate(spec: RunSpec, workdir, devices) -> dict[str, Any]:
  config = spec.to_config()  # what config.json records and the workdir check compares
  check_matches_workdir(config, workdir)  # before anything is written there
  if spec.init.pretrained and not os.path.exists(spec.init.pretrained):  # before the data loads
    raise ConfigError(
      f'config.init.pretrained={spec.init.pretrained!r}: no such file or directory.'
    )
  run = setup_run(spec, devices, workdir)
  is_writer = jax.process_index() == 0
  if is_writer:
    logging.info(
      'Writing to %s: config.json, run.json, checkpoints/, metrics.jsonl, results.json at '
      'the end; %s',
      workdir,
      tensorboard_hint(tensorboard_dir(workdir)),
    )
    io_utils.remove_stale_temporaries(workdir)
    io_utils.write_json(os.path.join(workdir, 'config.json'), json.loads(config.to_json()))
  ds, batch = run.datasets, spec.train.batch_size
  prototypes = run.prototypes(workdir)
  rows = parallel.process_rows(run.mesh, batch)  # this process's part of every batch
  cadence = Cadence.of(spec.train, len(ds.train))
  run_length = cadence.run_length(spec.train, len(ds.train))
  if is_writer:
    io_utils.write_json(os.path.join(workdir, 'run.json'), run_length)
  tx, learning_rate = run.optimizer(cadence.total_steps)

  ckpts = Checkpoints(workdir, keep=spec.train.keep_checkpoints)
  logger = None
  try:
    state, resumed = run.state_spec.restore_or_init(ckpts, tx, run.baseline(), run.pretrained())
    _check_not_beyond(state, cadence, workdir)
    start_step = int(state.step)
    logger = MetricLogger(workdir, enabled=is_writer, resumed_step=start_step)
    logger.write_text(start_step, 'config', _as_markdown_code(config.to_json(indent=2)))
    logger.write_text(start_step, 'run_length', _as_markdown_code(json.dumps(run_length, indent=2)))
    if resumed:
      logger.info(f'Resumed from {ckpts.latest.directory} at step {start_step}.')
    train_step = run.train_step(tx, learning_rate)
    eval_step = run.eval_step()
    logger.info(
      f'Training {spec.model.name} on {ds.info.name} with loss '
      f'{conditions.loss_formula(spec.objective)}: {cadence.total_steps} steps '
      f'({cadence.steps_per_epoch} per epoch, global batch {batch}) from step {start_step}.'
    )

    window = _Window(batch, train_metric_keys(run.objective, run.model))
    t_start = time.time()
    pending = None  # (step, device metrics) of the step before, checked one step late
    # Step s's examples are train_batch_indices(seed, s); a streamed split reads them ahead.
    batches = data.train_batches(ds.train, batch, spec.seed, start_step, cadence.total_steps, rows)
    for step, (host_images, host_labels) in zip(range(start_step, cadence.total_steps), batches):
      images, labels = parallel.shard_local(run.mesh, batch, host_images, host_labels)
      state, metrics = train_step(state, images, labels, prototypes['train'])
      if pending is not None:
        window.add(_check_pending(pending, ckpts))
      pending = (step, metrics)
      done = step + 1
      log_now = cadence.due(done, cadence.log_every)
      validate_now = cadence.due(done, cadence.validate_every)
      save_now = cadence.due(done, cadence.save_every)
      if not (log_now or validate_now or save_now):
        continue
      window.add(_check_pending(pending, ckpts))
      pending = None
      if log_now:
        steps_per_second = (done - start_step) / max(time.time() - t_start, 1e-9)
        _log_train(
          logger, cadence, done, window.close(float(metrics['learning_rate'])), steps_per_second
        )
      t_pause = time.time()
      if validate_now:
        _validate(run, eval_step, state, prototypes['val'], logger, ckpts, done)
      if save_now:
        ckpts.save(done, state)
      window.exclude(time.time() - t_pause)

    summary = _test(run, eval_step, state, prototypes['train'], logger, ckpts)
    summary['train_seconds_this_session'] = time.time() - t_start
    if is_writer:
      io_utils.write_json(os.path.join(workdir, 'results.json'), summary)
    logger.info(
      f'Done: {os.path.join(workdir, "results.json")}, metrics.jsonl and checkpoints/ in '
      f'{workdir}; {tensorboard_hint(tensorboard_dir(workdir))}'
    )
    return summary | {'state': state}
  finally:
    ckpts.wait()
    ckpts.close()
    if logger is not None:
      logger.close()


def _check_not_beyond(state, cadence: Cadence, workdir: str) -> None:
  """A ConfigError when the restored state is past the run's length."""
  if int(state.step) > cadence.total_steps:
    raise ConfigError(
      f'the checkpoint in {workdir} is at step {int(state.step)}, beyond this '
      f"config's {cadence.total_steps} steps (config.train.num_steps / num_epochs): "
      'use a new --workdir or more steps.'
    )


def _as_markdown_code(text: str) -> str:
  """`text` as a Markdown code block (TensorBoard's Text tab renders Markdown)."""
  return '\n'.join('    ' + line for line in text.splitlines())


def _log_train(logger, cadence: Cadence, done: int, train: dict, steps_per_second: float):
  logger.write(done, 'train', train)
  eta = format_duration((cadence.total_steps - done) / steps_per_second)
  loss = f'loss {train["loss"]:.4f}'
  terms = [f'{k} {train[k]:.4f}' for k in ('ce', 'cam', 'penalty') if k in train]
  if terms:
    loss += f' ({" ".join(terms)})'
  logger.info(
    f'{cadence.position(done)} | {loss} acc {100 * train["accuracy"]:.2f}% | '
    f'lr {train["learning_rate"]:.3g} | {train["images_per_second"]:.0f} img/s | ETA {eta}'
  )


def _validate(run, eval_step, state, prototypes, logger, ckpts: Checkpoints, done: int):
  """Validation metrics logged, the class maps next to the prototypes in TensorBoard, and
  the model variables offered to the best checkpoint."""
  variables = state.model_variables()
  val, class_maps = split_loop.evaluate_split(
    run, eval_step, variables, run.datasets.val, prototypes
  )
  logger.write(done, 'val', val)
  image = figures.cams_next_to_prototypes(
    class_maps,
    prototypes,
    run.datasets.info.class_names,
    f'step {done}: validation prototypes and class-mean maps of the objective',
  )
  logger.write_image(done, 'val/class_cams_vs_prototypes', image)
  logger.info(
    f'step {done} validation: loss {val["loss"]:.4f} '
    f'accuracy {100 * val["accuracy"]:.2f}% | prototype loss '
    f'{val["proto_loss"]:.4f} Batch-CAM loss {val["bcam_loss"]:.4f} '
    f'({run.objective.metric})'
  )
  ckpts.save_best(done, variables, val['accuracy'])


def _test(run, eval_step, state, prototypes, logger, ckpts: Checkpoints) -> dict[str, Any]:
  """The final parameters' test metrics, logged, as the run's summary."""
  test, _ = split_loop.evaluate_split(
    run, eval_step, state.model_variables(), run.datasets.test, prototypes
  )
  logger.write(int(state.step), 'test', test)
  logger.info(
    f'test (final parameters): loss {test["loss"]:.4f} accuracy {100 * test["accuracy"]:.2f}%'
  )
  ckpts.wait()
  return {
    'step': int(state.step),
    'test_loss': test['loss'],
    'test_accuracy': test['accuracy'],
    'test_proto_loss': test['proto_loss'],
    'test_bcam_loss': test['bcam_loss'],
    'best_checkpoint_step': ckpts.best.best_step(),
    'num_devices': int(run.mesh.devices.size),
    'num_processes': jax.process_count(),
    'data_source': run.datasets.source,
  }


def _check_pending(pending, ckpts: Checkpoints) -> dict[str, float]:
  step, device_metrics = pending
  host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
  _check_finite(step, host, ckpts)
  return host
