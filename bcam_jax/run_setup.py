"""What training and evaluation of one config share: `setup_run` validates the config,
builds the mesh, loads the data and builds the model and its objective; the `RunSetup` it
returns makes the jitted steps, the initial or restored variables and the prototypes."""

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from bcam_jax import data, models, optim, parallel, prototypes, split_loop, steps
from bcam_jax.config_validation import ConfigError, complete, validate_config
from bcam_jax.models.base import is_stream_param
from bcam_jax.objective import LossKind, Objective
from bcam_jax.train_state import StateSpec


@dataclasses.dataclass
class RunSetup:
  """What training and evaluation of one config share."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  datasets: data.Datasets
  model: Any
  dtype: Any
  eval_batch_size: int
  objective: Objective

  def eval_step(self):
    """The jitted eval step (`steps.make_eval_step`) with a replicated output."""
    info = self.datasets.info
    return jax.jit(
      steps.make_eval_step(
        self.model,
        self.objective,
        mean=info.mean,
        std=info.std,
        dtype=self.dtype,
        image_size=self.config.data.image_size,
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
        image_size=self.config.data.image_size,
        seed=self.config.seed,
        frozen_backbone=self.frozen_backbone,
        augment=data.AugmentOptions.from_config(self.config.data),
      ),
      out_shardings=parallel.replicated(self.mesh),
      donate_argnums=0,
    )

  def prototypes(self, workdir: str) -> dict[str, jax.Array]:
    """Train and validation class prototypes (cached in `workdir`), replicated."""
    protos = prototypes.load_or_compute_prototypes(
      workdir,
      self.datasets,
      self.config.data.image_size,
      write=jax.process_index() == 0,
      kind=self.config.data.prototypes,
      prototypes_file=self.config.data.prototypes_file,
      source=self.config.data.prototypes_from,
    )
    return {k: parallel.replicate(self.mesh, v) for k, v in protos.items()}

  @property
  def channels(self) -> int:
    """The images' channel count, which the first convolution is built for."""
    return self.datasets.info.channels

  @property
  def frozen_backbone(self) -> bool:
    """CA-Stream's protocol: only the stream trains."""
    return bool(self.config.model.ca_stream.freeze_backbone)

  def optimizer(self, total_steps: int):
    """(tx, schedule) of `config.optimizer`; with a frozen backbone, tx updates the
    CA-Stream parameters only (q_0 and W_0..W_L, `models.base.is_stream_param`)."""
    tx, schedule = optim.make_optimizer(self.config.optimizer, total_steps)
    if self.frozen_backbone:
      tx = optim.train_only(tx, is_stream_param)
    return tx, schedule

  @property
  def state_spec(self) -> StateSpec:
    """What the run's train state is built from (`train_state.StateSpec`)."""
    return StateSpec(
      self.model, self.config.seed, self.config.data.image_size, self.channels, self.mesh
    )

  def baseline(self) -> tuple[Any, str] | None:
    """(model, workdir) of `config.init_from`, the trained run whose backbone and classifier
    start this one: this model with the default head and pooling; None without one."""
    cfg = self.config
    if not cfg.init_from:
      return None
    model = models.get_model(
      cfg.model.name,
      self.datasets.info.num_classes,
      dtype=self.dtype,
      conv_lowering=cfg.model.conv_lowering,
      **cfg.model.options,
    )
    return model, cfg.init_from


def setup_run(
  config: ml_collections.ConfigDict,
  devices: Sequence[jax.Device] | None = None,
  workdir: str | None = None,
) -> RunSetup:
  """Validates the config, builds the mesh, loads the data and builds the model.

  `workdir` caches the train mean and std of data without literature constants (an image
  folder, a TFDS dataset by name) in `<workdir>/data_stats.json`, written by process 0.
  """
  config = complete(config)  # a config written before a field existed: its default
  validate_config(config)
  mesh = parallel.make_mesh(devices)
  try:
    parallel.check_divisible(config.train.batch_size, mesh, 'config.train.batch_size')
  except ValueError as error:
    raise ConfigError(str(error)) from None
  n_dev = mesh.devices.size
  datasets = data.load_datasets(config.data, workdir, write_stats=jax.process_index() == 0)
  if config.train.batch_size > len(datasets.train):
    raise ConfigError(
      f'config.train.batch_size={config.train.batch_size} is larger than the '
      f'train split ({len(datasets.train)} images).'
    )
  # No larger than the largest split to evaluate (padding beyond it is wasted memory), and
  # a multiple of the device count.
  largest = max(len(datasets.val), len(datasets.test))
  eval_batch_size = min(config.eval.batch_size, largest)
  eval_batch_size = split_loop.batch_for_devices(eval_batch_size, n_dev)
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
      conv_lowering=config.model.conv_lowering,
      **config.model.options,
    )
  except ValueError as error:  # an unknown or invalid config.model.options entry
    raise ConfigError(f'config.model.options={dict(config.model.options)!r}: {error}') from None
  _check_cam_side(config, model)
  cam = models.cam_shape(model, config.data.image_size, datasets.info.channels)
  logging.info(
    'Model %s at %dx%dx%d: CAM layer %s; %d device(s) of %s; data from %s',
    config.model.name,
    config.data.image_size,
    config.data.image_size,
    datasets.info.channels,
    cam,
    n_dev,
    jax.devices()[0].platform,
    datasets.source,
  )
  objective = Objective.from_config(config, datasets.info.num_classes)
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
  if LossKind(config.loss.kind).has_cam_term and 1 <= side < 2:
    need = next(s for s in itertools.count(config.data.image_size) if model.cam_side(s) >= 2)
    raise ConfigError(
      f'config.data.image_size={config.data.image_size} gives {model.label()} a {side}x'
      f'{side} CAM map; config.loss.kind={config.loss.kind!r} compares CAM maps with the '
      f'class prototypes and needs at least 2x2: image_size >= {need}.'
    )
