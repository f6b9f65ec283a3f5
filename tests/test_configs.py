"""The experiment config: its argument gives each model x condition config; packaged configs
found by name, and config files by path."""

import os
import re
import sys

import pytest
from absl import flags

from bcam_jax import cli, conditions, configs
from bcam_jax.configs import experiment, resnet18_bcpl, resnet18_tpu
from bcam_jax.run_spec import RunSpec

# Per model: name, options, optimizer name, learning rate, weight decay, epochs.
MODELS = {
  'simple_cnn': ('simple_cnn', {}, 'sgd', 0.05, 5e-4, 5),
  'resnet18': ('resnet18', {'stem': 'small'}, 'sgd', 0.1, 5e-4, 5),
  'convnext_v2_tiny': (
    'convnext_v2_tiny',
    {'stem_stride': 1, 'drop_path_rate': 0.1},
    'adamw',
    1e-3,
    0.05,
    10,
  ),
}
# Per argument: loss kind, metric, lambda_cam, head, pooling, frozen backbone.
VARIANTS = {
  '': ('ce', 'l1', 1.0, 'default', 'default', False),
  'loss=proto': ('proto', 'l1', 1.0, 'default', 'default', False),
  'loss=bcpl': ('bcpl', 'l1', 0.1, 'default', 'default', False),
  'loss=bcpl,metric=ssim': ('bcpl', 'ssim', 0.1, 'default', 'default', False),
  'head=softcam': ('ce', 'l1', 1.0, 'softcam', 'default', False),
  'pooling=ca_stream,freeze=backbone': ('ce', 'l1', 1.0, 'default', 'ca_stream', True),
}


def _fields(config):
  return (
    config.model.name,
    config.model.options.to_dict(),
    config.optimizer.name,
    config.optimizer.learning_rate,
    config.optimizer.weight_decay,
    config.train.num_epochs,
  ), (
    config.loss.kind,
    config.loss.metric,
    config.loss.lambda_cam,
    config.model.head,
    config.model.pooling,
    config.model.ca_stream.freeze_backbone,
  )


@pytest.mark.parametrize('model', tuple(MODELS))
@pytest.mark.parametrize('variant', tuple(VARIANTS))
def test_argument_sets_model_and_condition(model, variant):
  config = experiment.get_config(f'model={model},{variant}')
  assert _fields(config) == (MODELS[model], VARIANTS[variant])
  assert config.data.name == 'mnist' and config.train.batch_size == 128


def test_defaults_and_named_configs():
  assert _fields(experiment.get_config()) == (MODELS['simple_cnn'], VARIANTS[''])
  assert _fields(experiment.get_config('')) == (MODELS['simple_cnn'], VARIANTS[''])
  bcpl = experiment.get_config('model=resnet18,loss=bcpl')
  assert resnet18_bcpl.get_config().to_json() == bcpl.to_json()
  tpu = resnet18_tpu.get_config()
  assert _fields(tpu)[1] == VARIANTS['loss=bcpl']
  assert (tpu.train.batch_size, tpu.optimizer.learning_rate) == (1024, 0.8)


def test_every_condition_round_trips_through_the_config():
  for name, condition in conditions.CONDITIONS.items():
    arg = f'loss={condition.loss}' + (f',metric={condition.metric}' if condition.metric else '')
    config = experiment.get_config(arg)
    assert (
      conditions.of_loss(RunSpec.from_config(config).objective) == condition
      and _describe(config) == name
    )
  assert [c.name for c in conditions.with_loss('bcpl')] == ['bcpl-l1', 'bcpl-l2', 'bcpl-ssim']


def test_ablations_train_through_the_features_under_names_of_their_own():
  config = conditions.apply(experiment.get_config(), conditions.get('bcpl-l1-through_features'))
  assert (config.loss.kind, config.loss.metric, config.loss.cam_gradient) == (
    'bcpl',
    'l1',
    'through_features',
  )
  assert _describe(config) == 'bcpl-l1-through_features'
  assert conditions.of_loss(RunSpec.from_config(config).objective) == conditions.get(
    'bcpl-l1-through_features'
  )
  # A paper condition applied afterwards trains through G again.
  config = conditions.apply(config, conditions.get('bcpl-l1'))
  assert config.loss.cam_gradient == 'full' and _describe(config) == 'bcpl-l1'
  assert len(conditions.ABLATIONS) == 6 and not set(conditions.ABLATIONS) & set(
    conditions.CONDITIONS
  )


@pytest.mark.parametrize(
  'arg, message',
  [
    ('model=vgg', "model='vgg' is not valid; choose one of .*'resnet18'"),
    ('loss=baseline', "loss='baseline' is not valid; choose one of .*'bcpl'"),
    ('lr=0.1', "'lr=0.1' is not key=value with a key among .*'metric'"),
    ('resnet18', "'resnet18' is not key=value"),
  ],
)
def test_unknown_keys_and_values_name_the_valid_choices(arg, message):
  with pytest.raises(ValueError, match=message):
    experiment.get_config(arg)


def test_packaged_configs_by_name():
  assert configs.names() == [
    'experiment',
    'finetune',
    'image_folder',
    'quick',
    'resnet18_bcpl',
    'resnet18_tpu',
    'tfds_rgb',
    'grids/cpu_small',
    'grids/gpu_table1',
    'grids/paper_table1',
    'grids/paper_table2',
  ]
  path = os.path.join(configs.DIRECTORY, 'experiment.py')
  assert configs.resolve('experiment') == path
  assert configs.resolve('experiment.py:model=resnet18') == path + ':model=resnet18'
  assert configs.resolve('grids/cpu_small') == os.path.join(
    configs.DIRECTORY, 'grids', 'cpu_small.py'
  )


def test_an_existing_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'experiment.py').write_text('def get_config():\n  return None\n')
  assert configs.resolve('experiment.py:model=resnet18') == 'experiment.py:model=resnet18'
  assert configs.resolve(str(tmp_path / 'experiment.py')) == str(tmp_path / 'experiment.py')


def test_unknown_config_lists_the_packaged_ones():
  with pytest.raises(
    ValueError, match="'configs/nope.py' is neither .*resnet18_bcpl.*grids/cpu_small"
  ):
    configs.resolve('configs/nope.py:model=resnet18')


def _parse_config_flag(monkeypatch, *overrides):
  """The config flag of a command parsed from `--config=resnet18_bcpl <overrides>`."""
  flag_values = flags.FlagValues()
  holder = cli.define_config_flag('config', 'a config', flag_values)
  argv = ['prog', '--config=resnet18_bcpl', *overrides]
  monkeypatch.setattr(sys, 'argv', argv)  # ml_collections reads its overrides there
  flag_values(argv)
  return holder.value


def test_command_line_sets_a_model_option_the_config_leaves_out(monkeypatch):
  assert resnet18_bcpl.get_config().model.options.to_dict() == {'stem': 'small'}  # no width
  config = _parse_config_flag(monkeypatch, '--config.model.options.width=8')
  assert config.model.options.to_dict() == {'stem': 'small', 'width': 8}
  config = _parse_config_flag(
    monkeypatch, '--config.model.name=convnext_v2_tiny', '--config.model.options.stem_stride=4'
  )
  # stem, resnet18's option, stays: run_setup refuses it for this model (test_train).
  assert config.model.options.to_dict() == {'stem': 'small', 'stem_stride': 4}


@pytest.mark.parametrize(
  'override, message',
  [
    (
      '--config.model.options.stride=2',
      "--config.model.options.stride: model 'resnet18' has no option 'stride'; its options: "
      'dtype, stem, width, zero_init_residual, batch_norm',
    ),
    (
      '--config.train.num_epoch=1',
      "--config.train.num_epoch: config.train has no field 'num_epoch'; its fields: ",
    ),
    ('--config.trian.num_epochs=1', "config has no field 'trian'; its fields: data, "),
  ],
)
def test_an_override_of_a_field_the_config_lacks_is_named(monkeypatch, override, message):
  """The program ends with one `error: ...` line naming the field (`cli`), no traceback."""
  with pytest.raises(SystemExit, match=r'^error: --config=.*: ' + re.escape(message)):
    _parse_config_flag(monkeypatch, override)


def test_a_config_written_before_a_field_existed_gets_its_default():
  """`config_validation.complete`: fields the config lacks come from the base config, at
  any depth; what it sets stays; the model's options are not the base's to fill."""
  from bcam_jax import config_validation
  from bcam_jax.configs import base

  config = experiment.get_config('model=resnet18,loss=bcpl')
  config.model.options = {'width': 8}
  config.data.image_size = 32
  with config.unlocked():
    for node, key in (
      (config.data, 'stream'),
      (config.data, 'augment'),
      (config.data, 'decode_workers'),
      (config.model, 'conv_lowering'),
      (config.eval, 'road'),
      (config.eval, 'methods'),
    ):
      del node[key]
  config.lock()
  completed = config_validation.complete(config)
  defaults = base.get_base_config()
  assert completed.data.stream == defaults.data.stream == 'auto'
  assert completed.data.augment.to_dict() == defaults.data.augment.to_dict()
  assert completed.data.decode_workers == 0 and completed.model.conv_lowering == 'auto'
  assert completed.eval.road is False and completed.eval.methods == ''
  assert completed.data.image_size == 32 and completed.loss.kind == 'bcpl'
  assert completed.model.options.to_dict() == {'width': 8}
  assert completed.is_locked
  assert config_validation.complete(completed).to_dict() == completed.to_dict()
  assert 'stream' not in config.data  # the config itself is left as it was


def _describe(config) -> str:
  spec = RunSpec.from_config(config)
  return conditions.describe(spec.objective, spec.model)
