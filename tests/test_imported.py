"""A linen model of the user's own through train.py and eval.py by import path
(`--config.model.name=tests.user_models:UserNet --config.model.cam_layer=conv2`): BCPL
training, a killed run resumed bit for bit, eval.py's explanations, the workdir check, and
one-line errors for a path that does not import, a class that is not a linen module and a
layer it does not have (the nearest names first)."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from bcam_jax import config_validation, train_lib
from bcam_jax.configs import experiment
from tests import entry_points, synthetic

PATH = 'tests.user_models:UserNet'
STEPS = 12


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  return synthetic.write_dataset(str(tmp_path_factory.mktemp('idx')))


def _args(idx_dir, workdir, *extra):
  return [
    '--config=configs/experiment.py:model=simple_cnn,loss=bcpl',
    f'--workdir={workdir}',
    f'--config.model.name={PATH}',
    '--config.model.cam_layer=conv2',
    '--config.data.source=idx',
    f'--config.data.idx_dir={idx_dir}',
    '--config.data.val_size=40',
    '--config.train.batch_size=16',
    f'--config.train.num_steps={STEPS}',
    '--config.train.checkpoint_every_steps=4',
    '--config.train.log_every_steps=4',
    '--config.train.eval_every_steps=6',
    '--config.eval.batch_size=40',
    *extra,
  ]


def _run(script, *args, check=True):
  return entry_points.run(script, *args, check=check)


def _params(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    assert manager.latest_step() == STEPS
    return manager.restore(STEPS)['params']


def test_train_py_trains_resumes_and_eval_py_explains_a_model_by_import_path(idx_dir, tmp_path):
  clean, killed = str(tmp_path / 'clean'), str(tmp_path / 'killed')
  proc = _run('train.py', *_args(idx_dir, clean))
  assert f'Model {PATH} at 28x28x1: CAM layer (14, 14, 16)' in proc.stderr
  records = [json.loads(line) for line in open(os.path.join(clean, 'metrics.jsonl'))]
  train = [r for r in records if r['split'] == 'train']
  assert all(np.isfinite(r['cam']) and r['cam'] > 0 for r in train)
  assert json.load(open(os.path.join(clean, 'config.json')))['model']['name'] == PATH

  # SIGKILL just after the step-8 train state is handed to Orbax, then the same command.
  proc = _run('tests/kill_at.py', 'save', '8', 'SIGKILL', *_args(idx_dir, killed), check=False)
  assert proc.returncode != 0
  proc = _run('train.py', *_args(idx_dir, killed))
  resumed_at = int(proc.stderr.split('Resumed from')[1].split('at step ')[1].split('.')[0])
  assert resumed_at in (4, 8)
  flat = lambda tree: [np.asarray(v) for v in __import__('jax').tree.leaves(tree)]
  for a, b in zip(flat(_params(clean)), flat(_params(killed))):
    np.testing.assert_array_equal(a, b)

  _run(
    'eval.py',
    *_args(idx_dir, killed),
    '--config.eval.methods=grad_cam,grad_cam_pp,score_cam',
    '--config.eval.num_images=16',
    '--config.eval.num_overlays=2',
  )
  metrics = json.load(open(os.path.join(killed, 'eval', 'metrics.json')))
  assert sorted(metrics['methods']) == ['grad_cam', 'grad_cam_pp', 'score_cam']
  assert all(np.isfinite(m['image_l1']) for m in metrics['methods'].values())
  assert os.path.getsize(os.path.join(killed, 'eval', 'overlays.png')) > 0

  # The workdir records the model: another CAM layer is another run.
  proc = _run('eval.py', *_args(idx_dir, killed, '--config.model.cam_layer=conv1'), check=False)
  assert proc.returncode == 1
  assert "model.cam_layer: 'conv2' in the workdir, 'conv1' now" in proc.stderr.splitlines()[-1]


def test_a_layer_it_does_not_have_fails_in_one_line(idx_dir, tmp_path):
  proc = _run(
    'train.py', *_args(idx_dir, tmp_path / 'run', '--config.model.cam_layer=conv9'), check=False
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
    f"error: config.model.cam_layer='conv9' is not a layer of {PATH}; nearest: "
    'conv2 (1, 14, 14, 16), conv1 (1, 28, 28, 8), bn (1, 14, 14, 16), Dropout_0 (1, 14, 14, 16)'
  )
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'model.name': 'tests.no_such_module:Net'}, r"cannot import 'tests.no_such_module'"),
    ({'model.name': 'tests.user_models:Missing'}, r"module 'tests.user_models' has no 'Missing'"),
    (
      {'model.name': 'tests.user_models:NOT_A_MODULE'},
      r'is a int, not a Flax linen module class; train NNX',
    ),
    ({'model.cam_layer': ''}, r'needs config.model.cam_layer=<the path of the submodule'),
    ({'model.head': 'softcam'}, r"config.model.head='softcam' applies to the zoo models"),
  ],
  ids=['module', 'class', 'not_a_module', 'no_layer', 'softcam'],
)
def test_import_paths_are_checked(fields, message):
  config = experiment.get_config('model=simple_cnn,loss=bcpl')
  config.model.name, config.model.cam_layer = PATH, 'conv2'
  for key, value in fields.items():
    section, field = key.split('.')
    config[section][field] = value
  with pytest.raises(config_validation.ConfigError, match=message) as error:
    config_validation.validate_config(config)
  assert '\n' not in str(error.value)


def test_options_go_to_the_constructor(idx_dir, tmp_path):
  config = experiment.get_config('model=simple_cnn')
  config.model.name, config.model.cam_layer = PATH, 'conv2'
  config.model.options = {'width': 2}
  config.data.source, config.data.idx_dir, config.data.val_size = 'idx', idx_dir, 40
  config.train.batch_size, config.train.num_steps, config.eval.batch_size = 16, 2, 40
  result = train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['state'].params['inner']['conv1']['kernel'].shape == (3, 3, 1, 2)
  config.model.options = {'depth': 3}
  with pytest.raises(
    config_validation.ConfigError,
    match=r"UserNet\(num_classes=10, \*\*\{'depth': 3\}\) failed: .*depth",
  ):
    train_lib.train_and_evaluate(config, str(tmp_path / 'other'))
