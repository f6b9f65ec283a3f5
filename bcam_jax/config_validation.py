"""Start-up checks of a training config: unknown names and impossible values fail fast.

Each error names the config field, the offending value and what is valid, before any
data is loaded or any model is compiled. `complete` gives a config written before a field
existed that field at its `configs/base.py` default, once, so the code reads every field
directly.
"""

import json
import os

import jax
import ml_collections

from bcam_jax import data, objective, optim
from bcam_jax.configs import base
from bcam_jax.models import MODEL_NAMES, PRETRAINED_NAMES, is_import_path, model_option_defaults
from bcam_jax.models.conv import LOWERINGS
from bcam_jax.models.heads import HEAD_TYPES, POOLINGS, HeadKind
from bcam_jax.models.imported import import_class

DTYPES = ('float32', 'bfloat16', 'float64')
DATA_SOURCES = ('auto', 'tfds', 'idx', 'download', 'folder')
FOLDER_CHANNELS = (0, 1, 3)  # 0: from the images


class ConfigError(ValueError):
  """A config field holds an unknown name or an impossible value."""


def _choice(field: str, value, valid) -> None:
  if value not in valid:
    raise ConfigError(f'config.{field}={value!r} is not valid; choose one of {tuple(valid)}.')


def _positive(field: str, value, allow_zero: bool = False) -> None:
  ok = (
    isinstance(value, int)
    and not isinstance(value, bool)
    and (value >= 0 if allow_zero else value > 0)
  )
  if not ok:
    expected = 'a non-negative integer' if allow_zero else 'a positive integer'
    raise ConfigError(f'config.{field}={value!r}; expected {expected}.')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError on the first invalid field."""
  if is_import_path(config.model.name):
    _validate_imported(config)
  else:
    _choice('model.name', config.model.name, MODEL_NAMES)
  _choice('data.source', config.data.source, DATA_SOURCES)
  if config.data.source == 'folder':
    _validate_folder(config.data)
  elif config.data.source == 'tfds' and config.data.name not in data.DATASETS:
    _validate_tfds_by_name(config.data)
  else:
    _choice('data.name', config.data.name, tuple(data.DATASETS))
    if config.data.channels not in (None, 0, 1):
      raise ConfigError(
        f'config.data.channels={config.data.channels!r} applies to image folders and TFDS '
        f'datasets by name; {config.data.name!r} has 1 channel: leave it 0 (or 1).'
      )
  if config.data.source != 'folder' and config.data.folder_dir:
    raise ConfigError(
      f'config.data.folder_dir={config.data.folder_dir!r} is read only with '
      f"config.data.source='folder', but config.data.source={config.data.source!r}; "
      "set config.data.source='folder' to train on the folder."
    )
  _validate_prototypes(config.data)
  _validate_stream_and_augment(config.data)
  _positive('data.image_size', config.data.image_size)
  _positive('data.val_size', config.data.val_size)
  _positive('train.batch_size', config.train.batch_size)
  _positive('eval.batch_size', config.eval.batch_size)
  if config.train.num_steps <= 0:
    _positive('train.num_epochs', config.train.num_epochs)
  _positive('train.log_every_steps', config.train.log_every_steps)
  _positive('train.eval_every_steps', config.train.eval_every_steps, allow_zero=True)
  _positive('train.checkpoint_every_steps', config.train.checkpoint_every_steps)
  _positive('train.keep_checkpoints', config.train.keep_checkpoints)
  _choice('train.dtype', config.train.dtype, DTYPES)
  if config.train.dtype == 'float64' and not jax.config.jax_enable_x64:
    raise ConfigError(
      "config.train.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 "
      "(or jax.config.update('jax_enable_x64', True) before any JAX call)."
    )
  _choice('optimizer.name', config.optimizer.name, optim.OPTIMIZERS)
  _choice('optimizer.schedule', config.optimizer.schedule, optim.SCHEDULES)
  if not config.optimizer.learning_rate > 0:
    raise ConfigError(
      f'config.optimizer.learning_rate={config.optimizer.learning_rate!r}; expected > 0.'
    )
  if config.optimizer.weight_decay < 0:
    raise ConfigError(
      f'config.optimizer.weight_decay={config.optimizer.weight_decay!r}; expected >= 0.'
    )
  _choice('loss.kind', config.loss.kind, objective.LOSS_KINDS)
  _choice('loss.metric', config.loss.metric, objective.METRICS)
  _choice(
    'loss.elastic_net_reduction',
    config.loss.elastic_net_reduction,
    objective.ELASTIC_NET_REDUCTIONS,
  )
  _choice('loss.cam_gradient', config.loss.cam_gradient, objective.CAM_GRADIENTS)
  _choice('model.head', config.model.head, HEAD_TYPES)
  _choice('model.pooling', config.model.pooling, POOLINGS)
  _choice('model.conv_lowering', config.model.conv_lowering, LOWERINGS)
  try:
    kind = HeadKind(config.model.head, config.model.pooling)
  except ValueError as error:  # names are valid: a combination that does not exist
    raise ConfigError(f'config.model: {error}; choose one.') from None
  if kind.evidence and config.loss.cam_gradient != 'full':
    raise ConfigError(
      f"config.loss.cam_gradient={config.loss.cam_gradient!r} holds Grad-CAM's gradient G "
      'constant, but config.model.head="softcam" explains by evidence maps, which have no '
      "G: use config.loss.cam_gradient='full'."
    )
  if (config.loss.lambda_l1 or config.loss.lambda_l2) and not kind.evidence:
    raise ConfigError(
      'config.loss.lambda_l1 / lambda_l2 penalise Soft-CAM evidence maps: '
      'they need config.model.head="softcam".'
    )
  _choice('data.normalization', config.data.normalization, data.NORMALIZATIONS)
  _positive('data.test_size', config.data.test_size, allow_zero=True)
  _validate_init(config)
  if config.model.ca_stream.freeze_backbone:
    if not kind.attention:
      raise ConfigError(
        'config.model.ca_stream.freeze_backbone=True needs config.model.pooling="ca_stream".'
      )
    if not config.init_from:
      raise ConfigError(
        'config.model.ca_stream.freeze_backbone=True needs '
        'config.init_from=<workdir of a trained baseline run>.'
      )
  if config.init_from and not os.path.isdir(config.init_from):
    raise ConfigError(f'config.init_from={config.init_from!r} is not a directory.')
  for field in ('lambda_class', 'lambda_cam', 'lambda_l1', 'lambda_l2'):
    value = config.loss[field]
    if not (isinstance(value, (int, float)) and value >= 0 and value == value):
      raise ConfigError(f'config.loss.{field}={value!r}; expected a number >= 0.')


def _validate_imported(config: ml_collections.ConfigDict) -> None:
  """A model by import path: a linen module class that imports, a CAM layer named, and the
  default head and pooling (the zoo's Soft-CAM and CA-Stream heads are not its)."""
  name = config.model.name
  try:
    import_class(name)
  except (ImportError, TypeError) as error:
    raise ConfigError(f'config.model.name={name!r}: {error}') from None
  if not config.model.cam_layer:
    raise ConfigError(
      f'config.model.name={name!r} needs config.model.cam_layer=<the path of the submodule '
      "whose output is its CAM layer, e.g. 'conv3' or 'backbone/stage4'>."
    )
  for field in ('head', 'pooling'):
    if config.model[field] != 'default':
      raise ConfigError(
        f'config.model.{field}={config.model[field]!r} applies to the zoo models; '
        f'{name} is explained by Grad-CAM at config.model.cam_layer.'
      )
  if config.init_from or config.init.pretrained or config.model.ca_stream.freeze_backbone:
    raise ConfigError(
      f'config.init_from, config.init.pretrained and freezing apply to the zoo models; '
      f'{name} starts from its own initialisers.'
    )


def _validate_init(config: ml_collections.ConfigDict) -> None:
  """config.init: published weights for a model that has their layout, and a frozen
  backbone only where something trained starts it."""
  pretrained, freeze = config.init.pretrained, config.init.freeze_backbone
  if not isinstance(freeze, bool):
    raise ConfigError(f'config.init.freeze_backbone={freeze!r}; expected True or False.')
  if pretrained:
    if config.model.name not in PRETRAINED_NAMES:
      raise ConfigError(
        f'config.init.pretrained needs a model with published weights; '
        f'config.model.name={config.model.name!r} is not one of {PRETRAINED_NAMES}.'
      )
    if config.init_from:
      raise ConfigError(
        'config.init.pretrained and config.init_from both set where a run starts; choose one.'
      )
    if config.model.ca_stream.freeze_backbone:
      raise ConfigError(
        'config.model.ca_stream.freeze_backbone=True trains only the stream on the classifier '
        'of config.init_from; published weights bring no classifier for your classes: use '
        'config.init.freeze_backbone=True (the stream and a new classifier train).'
      )
  if freeze and not (pretrained or config.init_from):
    raise ConfigError(
      'config.init.freeze_backbone=True needs weights to freeze: '
      'config.init.pretrained=<weights file or bcam-weights convert directory> or '
      'config.init_from=<workdir of a trained run>.'
    )
  if freeze and config.model.ca_stream.freeze_backbone:
    raise ConfigError(
      'config.init.freeze_backbone and config.model.ca_stream.freeze_backbone are both set; '
      'choose one (the second trains only the stream).'
    )


def _validate_folder(data_config: ml_collections.ConfigDict) -> None:
  """The fields of data.source='folder': an existing folder_dir, a label of its own as name
  (not a built-in dataset's, which would mislabel the runs) and a valid channel count."""
  if not data_config.folder_dir:
    raise ConfigError(
      "config.data.source='folder' needs config.data.folder_dir=<root>, the folder holding "
      '<root>/train/<class>/*.{png,jpg,jpeg}, <root>/test/... and optionally <root>/val/...; '
      'it is empty.'
    )
  if not os.path.isdir(os.path.expanduser(data_config.folder_dir)):
    raise ConfigError(
      f'config.data.folder_dir={data_config.folder_dir!r} is not a directory; expected the '
      'root of <root>/train/<class>/*.{png,jpg,jpeg}.'
    )
  name = data_config.name
  if not isinstance(name, str) or not name or name in data.DATASETS:
    raise ConfigError(
      f"config.data.name={name!r} with config.data.source='folder': expected a label of "
      f'your own for the folder (e.g. its name), not empty and none of the built-in '
      f'{tuple(data.DATASETS)}, which load from the other sources.'
    )
  _choice('data.channels', data_config.channels, FOLDER_CHANNELS)


def _validate_tfds_by_name(data_config: ml_collections.ConfigDict) -> None:
  """A TFDS dataset by name: a non-empty name and a valid channel count (whether TFDS knows
  the name is for the loader to say, with TFDS's own message)."""
  if not isinstance(data_config.name, str) or not data_config.name.strip():
    raise ConfigError(
      f"config.data.name={data_config.name!r} with config.data.source='tfds': expected a TFDS "
      "dataset name such as 'cifar10'."
    )
  _choice('data.channels', data_config.channels, FOLDER_CHANNELS)


def _validate_prototypes(data_config: ml_collections.ConfigDict) -> None:
  """data.prototypes is a known kind; 'file' needs an existing data.prototypes_file, which
  is read only with 'file'."""
  _choice('data.prototypes', data_config.prototypes, data.PROTOTYPE_KINDS)
  sources = data.PROTOTYPE_SOURCES
  _choice('data.prototypes_from', data_config.prototypes_from, sources)
  path = data_config.prototypes_file
  if data_config.prototypes == 'file':
    if not path or not os.path.isfile(os.path.expanduser(path)):
      raise ConfigError(
        f"config.data.prototypes='file' needs config.data.prototypes_file=<path.npy>, an "
        f'existing .npy of shape (num_classes, H, W) or (num_classes, C, H, W); got {path!r}.'
      )
  elif path:
    raise ConfigError(
      f'config.data.prototypes_file={path!r} is read only with config.data.prototypes='
      f"'file', but config.data.prototypes={data_config.prototypes!r}."
    )


def _validate_stream_and_augment(data_config: ml_collections.ConfigDict) -> None:
  """data.stream / in_memory_limit_mb / decode_workers (streaming serves image folders) and
  data.augment's flags and ranges."""
  stream = data_config.stream
  _choice('data.stream', stream, data.streaming.STREAM_MODES)
  by_name = data_config.source == 'tfds' and data_config.name not in data.DATASETS
  if stream == 'stream' and data_config.source != 'folder' and not by_name:
    raise ConfigError(
      f"config.data.stream='stream' streams image folders (config.data.source='folder') and "
      f'TFDS datasets by name; {data_config.name!r} from config.data.source='
      f'{data_config.source!r} is read into memory: use stream auto or memory.'
    )
  limit = data_config.in_memory_limit_mb
  if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 0:
    raise ConfigError(
      f'config.data.in_memory_limit_mb={limit!r}; expected a number of MiB >= 0 (stream '
      "'auto' streams an image folder whose decoded splits exceed it)."
    )
  _positive('data.decode_workers', data_config.decode_workers, allow_zero=True)
  augment = data_config.augment
  for flag in ('random_resized_crop', 'horizontal_flip'):
    if not isinstance(augment[flag], bool):
      raise ConfigError(f'config.data.augment.{flag}={augment[flag]!r}; expected True or False.')
  for name in ('scale', 'ratio'):
    value = augment[name]
    if not (
      isinstance(value, (tuple, list))
      and len(value) == 2
      and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
      raise ConfigError(f'config.data.augment.{name}={value!r}; expected a pair (low, high).')
  try:
    data.AugmentOptions.from_config(data_config).check()
  except ValueError as e:
    raise ConfigError(str(e)) from None


# Fields a workdir's checkpoints depend on: a resumed run or an evaluation must not change them.
# data.channels sets the first convolution's input depth; the prototypes, cached in the
# workdir, are what a CAM loss trained towards.
_STRUCTURAL = (
  'model.',
  'data.name',
  'data.image_size',
  'data.channels',
  'data.prototypes',
  'data.normalization',
  'init.freeze_backbone',
  'optimizer.name',
)
# Fields that change how a step computes, never the variables or their values beyond rounding.
_SPEED_ONLY = ('model.conv_lowering', 'model.options.batch_norm')


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with every field of the base config it lacks, at its default; the
  fields it has keep their values. Model options are the model's (`models`), not the
  base's: they are left as they are."""
  completed = ml_collections.ConfigDict(config.to_dict(), type_safe=config.is_type_safe)

  def add_missing(node, defaults, path):
    for key, default in defaults.items():
      if key not in node:
        node[key] = default
      elif isinstance(default, ml_collections.ConfigDict) and path + (key,) != _OPTIONS:
        add_missing(node[key], default, path + (key,))

  add_missing(completed, base.get_base_config(), ())
  if config.is_locked:
    completed.lock()
  return completed


_OPTIONS = ('model', 'options')


def check_matches_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """ConfigError listing the fields that differ from the config recorded in
  `<workdir>/config.json` among those its checkpoints depend on (model, dataset, image
  size, optimizer); nothing to check in a new workdir."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return
  with open(path, encoding='utf-8') as f:
    recorded = _flatten(json.load(f))
  # A field added since the workdir was written holds its default there.
  recorded = _with_option_defaults(
    _flatten(json.loads(base.get_base_config().to_json())) | recorded
  )
  requested = _with_option_defaults(_flatten(json.loads(config.to_json())))
  # Options of two different models do not compare: the names differing says it all.
  same_model = recorded.get('model.name') == requested.get('model.name')
  differing = [
    f'{key}: {recorded.get(key)!r} in the workdir, {requested.get(key)!r} now'
    for key in sorted(set(recorded) | set(requested))
    if key.startswith(_STRUCTURAL)
    and key not in _SPEED_ONLY
    and (same_model or not key.startswith('model.options.'))
    and recorded.get(key) != requested.get(key)
  ]
  if differing:
    raise ConfigError(
      f'{workdir} was trained with another model or data than this config ('
      + '; '.join(differing)
      + '). Use the config it was trained with, or a new --workdir.'
    )


def _with_option_defaults(flat: dict) -> dict:
  """A flattened config with every option its model leaves out at its default: an option
  set to its default builds the same model as one left out."""
  name = flat.get('model.name')
  if name not in MODEL_NAMES:
    return flat
  defaults = model_option_defaults(name)
  return {f'model.options.{key}': value for key, value in defaults.items()} | flat


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat
