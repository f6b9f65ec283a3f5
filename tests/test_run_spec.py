"""`RunSpec`: a config read once into typed specs, and a run built by hand without one."""

import importlib
import json
import os

import jax
import numpy as np
import pytest

from bcam_jax import config_validation, data, eval_lib, models, train_lib
from bcam_jax.eval_options import EvalOptions
from bcam_jax.objective import LossKind, Objective
from bcam_jax.optim import OptimizerSpec
from bcam_jax.run_spec import RunSpec, TrainSpec
from tests import synthetic
from tests.test_train import tiny_config


@pytest.mark.parametrize(
  'name, arg',
  [
    ('experiment', 'model=resnet18,loss=bcpl,metric=ssim'),
    ('experiment', 'model=simple_cnn,head=softcam'),
    ('experiment', 'model=convnext_v2_tiny,pooling=ca_stream'),
    ('resnet18_bcpl', None),
    ('resnet18_tpu', None),
    ('tfds_rgb', None),
  ],
)
def test_to_config_gives_back_the_completed_config(name, arg):
  """Every field of a packaged config survives the specs: `to_config` is what config.json
  records and what the workdir check compares."""
  module = importlib.import_module(f'bcam_jax.configs.{name}')
  config = module.get_config(arg) if arg else module.get_config()
  config.eval.methods = 'grad_cam,score_cam'
  expected = json.loads(config_validation.complete(config).to_json())
  assert json.loads(RunSpec.from_config(config).to_config().to_json()) == expected


def test_from_config_reads_each_section_into_its_spec(tmp_path):
  config = tiny_config('/nowhere', 'model=resnet18,pooling=ca_stream,loss=bcpl')
  config.model.options = {'stem': 'imagenet'}
  config.model.ca_stream.freeze_backbone = True
  config.init_from = str(tmp_path)
  config.eval.methods = 'grad_cam, raw_attention'
  config.data.augment.horizontal_flip = True
  spec = RunSpec.from_config(config)
  assert spec.model == models.ModelSpec(
    name='resnet18', pooling='ca_stream', options={'stem': 'imagenet'}, freeze_backbone=True
  )
  assert spec.data.idx_dir == '/nowhere' and spec.data.augment == data.AugmentOptions(
    horizontal_flip=True
  )
  assert spec.init_from == str(tmp_path)
  assert spec.train.batch_size == 16 and spec.eval_batch_size == 24
  assert spec.objective.kind is LossKind.BCPL and spec.objective.prototype_size == 28
  assert spec.evaluation.methods == ('grad_cam', 'raw_attention')
  assert spec.optimizer.warmup_steps == 3


def test_a_bad_eval_field_is_a_config_error_naming_it():
  config = tiny_config('/nowhere')
  config.eval.overlay_selection = 'worst'
  with pytest.raises(config_validation.ConfigError, match="config.eval: overlay_selection='worst'"):
    RunSpec.from_config(config)


def test_a_run_built_by_hand_trains_as_its_config_does(tmp_path):
  """The library from one's own code: a RunSpec of typed values, no ConfigDict, trains and
  evaluates to exactly what the equivalent config gives."""
  idx_dir = synthetic.write_dataset(str(tmp_path / 'idx'))
  spec = RunSpec(
    data=data.DataSpec(source='idx', idx_dir=idx_dir, val_size=40),
    model=models.ModelSpec(name='simple_cnn'),
    train=TrainSpec(batch_size=16, num_steps=12, log_every_steps=4, checkpoint_every_steps=6),
    optimizer=OptimizerSpec(warmup_steps=3),
    objective=Objective(kind='bcpl', lambda_cam=0.1),
    evaluation=EvalOptions(methods=('grad_cam',), num_images=8, num_overlays=2),
    eval_batch_size=24,
  )
  config = tiny_config(idx_dir, 'model=simple_cnn,loss=bcpl', num_steps=12)
  config.train.log_every_steps, config.train.checkpoint_every_steps = 4, 6
  config.eval.methods, config.eval.num_images, config.eval.num_overlays = 'grad_cam', 8, 2
  assert RunSpec.from_config(config) == spec

  by_hand, by_config = str(tmp_path / 'hand'), str(tmp_path / 'config')
  trained = train_lib.train_and_evaluate(spec, by_hand)
  reference = train_lib.train_and_evaluate(config, by_config)
  for a, b in zip(
    jax.tree.leaves(trained['state'].params), jax.tree.leaves(reference['state'].params)
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def records(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
      rows = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if k != 'time' and 'second' not in k} for row in rows]

  assert records(by_hand) == records(by_config)
  with open(os.path.join(by_hand, 'config.json'), encoding='utf-8') as f:
    assert json.load(f) == json.loads(config_validation.complete(config).to_json())
  result = eval_lib.evaluate_and_report(spec, by_hand)  # the spec's own evaluation options
  assert list(result['methods']) == ['grad_cam'] and result['num_images'] == 8
  assert result['condition'] == 'bcpl-l1'
