"""What training and evaluation of one run share: `setup_run` builds the mesh, loads the data
and builds the model and its objective from a `run_spec.RunSpec`; the `RunSetup` it returns
makes the jitted steps, the train state's spec, the optimiser and the prototypes."""

import dataclasses
import difflib
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from bcam_jax import optim, parallel, prototypes, split_loop, steps
from bcam_jax.config_validation import ConfigError
from bcam_jax.data import Datasets, imagenet_normalized, load_datasets
from bcam_jax.models import cam_shape, is_import_path
from bcam_jax.models.base import is_stream_param
from bcam_jax.models.imported import layer_shapes as imported_layer_shapes
from bcam_jax.run_spec import RunSpec
from bcam_jax.train_state import StateSpec


@dataclasses.dataclass
class RunSetup:
  """What training and evaluation of one run share: its spec (`objective` holds the data's
  class count), mesh, data, model and compute dtype, and the validation and test batch."""

  spec: RunSpec
  mesh: jax.sharding.Mesh
  datasets: Datasets
  model: Any
  dtype: Any
  eval_batch_size: int

  @property
  def objective(self):
    return self.spec.objective

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
        image_size=self.spec.data.image_size,
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
        image_size=self.spec.data.image_size,
        seed=self.spec.seed,
        frozen_backbone=self.frozen_backbone,
        augment=self.spec.data.augment,
      ),
      out_shardings=parallel.replicated(self.mesh),
      donate_argnums=0,
    )

  def prototypes(self, workdir: str) -> dict[str, jax.Array]:
    """Train and validation class prototypes (cached in `workdir`), replicated."""
    protos = prototypes.load_or_compute_prototypes(
      workdir,
      self.datasets,
      self.spec.data.image_size,
      write=jax.process_index() == 0,
      kind=self.spec.data.prototypes,
      prototypes_file=self.spec.data.prototypes_file,
      source=self.spec.data.prototypes_from,
    )
    return {k: parallel.replicate(self.mesh, v) for k, v in protos.items()}

  @property
  def channels(self) -> int:
    """The images' channel count, which the first convolution is built for."""
    return self.datasets.info.channels

  @property
  def frozen_backbone(self) -> bool:
    """The backbone stays as it starts: CA-Stream's protocol (only the stream trains) or
    `init.freeze_backbone` (what follows the backbone trains)."""
    return self.spec.model.freeze_backbone or self.spec.init.freeze_backbone

  def optimizer(self, total_steps: int):
    """(tx, schedule) of the spec's optimiser; with CA-Stream's frozen protocol, tx updates
    the CA-Stream parameters only (q_0 and W_0..W_L, `models.base.is_stream_param`); with
    `init.freeze_backbone`, everything outside the backbone."""
    tx, schedule = optim.make_optimizer(self.spec.optimizer, total_steps)
    if self.spec.model.freeze_backbone:
      tx = optim.train_only(tx, is_stream_param)
    elif self.spec.init.freeze_backbone:
      tx = optim.train_only(tx, lambda path: path[:1] != ('backbone_net',))
    return tx, schedule

  @property
  def state_spec(self) -> StateSpec:
    """What the run's train state is built from (`train_state.StateSpec`)."""
    return StateSpec(
      self.model, self.spec.seed, self.spec.data.image_size, self.channels, self.mesh
    )

  def baseline(self) -> tuple[Any, str] | None:
    """(model, workdir) of `init_from`, the trained run whose backbone and classifier start
    this one: this model with the default head and pooling; None without one."""
    if not self.spec.init_from:
      return None
    model = self.spec.model.baseline(self.datasets.info.num_classes, self.dtype)
    return model, self.spec.init_from

  def pretrained(self) -> tuple[str, str] | None:
    """(model name, weights path) of `init.pretrained`; None without them."""
    if not self.spec.init.pretrained:
      return None
    return self.spec.model.name, self.spec.init.pretrained


def setup_run(
  spec: RunSpec,
  devices: Sequence[jax.Device] | None = None,
  workdir: str | None = None,
) -> RunSetup:
  """Builds the mesh, loads the data and builds the model of `spec`
  (`RunSpec.from_config(config)` for a config).

  `workdir` caches the train mean and std of data without literature constants (an image
  folder, a TFDS dataset by name) in `<workdir>/data_stats.json`, written by process 0.
  """
  mesh = parallel.make_mesh(devices)
  batch_size = spec.train.batch_size
  try:
    parallel.check_divisible(batch_size, mesh, 'config.train.batch_size')
  except ValueError as error:
    raise ConfigError(str(error)) from None
  n_dev = mesh.devices.size
  dtype = jnp.dtype(spec.train.dtype)
  imported = is_import_path(spec.model.name)
  if not imported:  # the options' values checked before the data loads (minutes for some)
    _build_model(spec, 2, dtype, imported)
  datasets = load_datasets(spec.data, workdir, write_stats=jax.process_index() == 0)
  if spec.normalization == 'imagenet':
    datasets = dataclasses.replace(datasets, info=imagenet_normalized(datasets.info))
    logging.info(
      "Normalising with ImageNet's mean %s and std %s (config.data.normalization=%r).",
      datasets.info.mean,
      datasets.info.std,
      spec.data.normalization,
    )
  if batch_size > len(datasets.train):
    raise ConfigError(
      f'config.train.batch_size={batch_size} is larger than the '
      f'train split ({len(datasets.train)} images).'
    )
  # No larger than the largest split to evaluate (padding beyond it is wasted memory), and
  # a multiple of the device count.
  largest = max(len(datasets.val), len(datasets.test))
  eval_batch_size = min(spec.eval_batch_size, largest)
  eval_batch_size = split_loop.batch_for_devices(eval_batch_size, n_dev)
  if eval_batch_size != spec.eval_batch_size:
    logging.info(
      'Evaluating in batches of %d (config.eval.batch_size=%d, %d device(s), largest split %d).',
      eval_batch_size,
      spec.eval_batch_size,
      n_dev,
      largest,
    )
  model = _build_model(spec, datasets.info.num_classes, dtype, imported)
  image_size = spec.data.image_size
  if imported:
    cam = _imported_cam_shape(spec, model, datasets.info.channels)
  else:
    _check_cam_side(spec, model)
    cam = cam_shape(model, image_size, datasets.info.channels)
  logging.info(
    'Model %s at %dx%dx%d: CAM layer %s; %d device(s) of %s; data from %s',
    spec.model.name,
    image_size,
    image_size,
    datasets.info.channels,
    cam,
    n_dev,
    jax.devices()[0].platform,
    datasets.source,
  )
  objective = dataclasses.replace(
    spec.objective, num_classes=datasets.info.num_classes, prototype_size=image_size
  )
  spec = dataclasses.replace(spec, objective=objective)
  return RunSetup(spec, mesh, datasets, model, dtype, eval_batch_size)


def _build_model(spec: RunSpec, num_classes: int, dtype, imported: bool):
  """`spec`'s model for `num_classes` classes; ConfigError for options it refuses."""
  try:
    return spec.model.build(num_classes, dtype)
  except (ImportError, TypeError) as error:  # a model by import path that does not build
    raise ConfigError(str(error)) from None
  except ValueError as error:  # an unknown or invalid config.model.options entry
    if imported:
      raise ConfigError(str(error)) from None
    raise ConfigError(f'config.model.options={dict(spec.model.options)!r}: {error}') from None


def _imported_cam_shape(spec: RunSpec, model, channels: int) -> tuple[int, int, int]:
  """(h, w, k) of a model by import path at its CAM layer; ConfigError for a layer it does
  not have (the nearest names first), one that gives no NHWC map, or a map too small for a
  CAM loss."""
  size = spec.data.image_size
  try:
    cam = cam_shape(model, size, channels)
  except ValueError:
    shapes = imported_layer_shapes(model, size, channels)
    near = difflib.get_close_matches(spec.model.cam_layer, list(shapes), n=5, cutoff=0.0)
    listed = ', '.join(f'{name} {shapes[name]}' for name in near)
    more = f' (and {len(shapes) - len(near)} more)' if len(shapes) > len(near) else ''
    raise ConfigError(
      f'config.model.cam_layer={spec.model.cam_layer!r} is not a layer of {spec.model.name}; '
      f'nearest: {listed or "none"}{more}'
    ) from None
  if len(cam) != 3:
    raise ConfigError(
      f'config.model.cam_layer={spec.model.cam_layer!r} of {spec.model.name} gives shape '
      f'{(1, *cam)}; the CAM layer must give NHWC maps (N, h, w, K)'
    )
  if spec.objective.kind.has_cam_term and min(cam[:2]) < 2:
    raise ConfigError(
      f'config.model.cam_layer={spec.model.cam_layer!r} of {spec.model.name} gives a '
      f'{cam[0]}x{cam[1]} map at config.data.image_size={size}; a CAM loss needs at least 2x2'
    )
  return cam


def _check_cam_side(spec: RunSpec, model) -> None:
  """Every model needs at least a 1x1 CAM map. A CAM loss compares maps with the class
  prototypes: a 1x1 map has nothing to compare (min-max scaling makes it 0) and its loss
  ends in NaN, so it needs at least 2x2."""
  size = spec.data.image_size
  side = model.cam_side(size)
  option = model.larger_cam_option()
  # The model option that fixes it at this size, when the model has one.
  or_option = f', or config.model.options.{option} (a larger CAM map)' if option else ''
  if side < 1:
    raise ConfigError(
      f'config.data.image_size={size} is too small for '
      f'{model.label()}: it needs image_size >= {model.min_image_side()}{or_option}.'
    )
  kind = spec.objective.kind
  if kind.has_cam_term and 1 <= side < 2:
    need = next(s for s in itertools.count(size) if model.cam_side(s) >= 2)
    raise ConfigError(
      f'config.data.image_size={size} gives {model.label()} a {side}x'
      f'{side} CAM map; config.loss.kind={str(kind)!r} compares CAM maps with the '
      f'class prototypes and needs at least 2x2: image_size >= {need}{or_option}.'
    )
