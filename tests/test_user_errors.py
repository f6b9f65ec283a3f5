"""A user's mistakes at the entry points end in one `error: ...` line (exit status 1, no
traceback): an unknown value after `configs/experiment.py:`, a config file with a syntax
error, eval.py on a workdir with nothing trained, train.py with a regular file as its workdir;
a failed start leaves no workdir it created; a prototypes file with constant maps warns with
the classes."""

import logging
import os

import numpy as np
import pytest

from bcam_jax import prototypes
from tests import entry_points, synthetic


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  return synthetic.write_dataset(str(tmp_path_factory.mktemp('idx')))


def _last_line(script, *args):
  proc = entry_points.run(script, *args)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  return proc.stderr.strip().splitlines()[-1]


def test_config_errors_are_one_line(tmp_path):
  workdir = str(tmp_path / 'run')
  line = _last_line(
    'train.py', '--config=configs/experiment.py:model=resnet99', f'--workdir={workdir}'
  )
  assert line == (
    'error: --config=configs/experiment.py:model=resnet99: configs/experiment.py: '
    "model='resnet99' is not valid; choose one of ('simple_cnn', 'resnet18', 'convnext_v2_tiny')."
  )
  line = _last_line('train.py', '--config=configs/experiment.py:size=3', f'--workdir={workdir}')
  assert line.startswith(
    "error: --config=configs/experiment.py:size=3: configs/experiment.py: 'size=3' is not "
    'key=value with a key among'
  )
  bad = tmp_path / 'my_config.py'
  bad.write_text('def get_config():\n  return {\n')
  line = _last_line('train.py', f'--config={bad}', f'--workdir={workdir}')
  assert line.startswith(f'error: --config={bad}: {bad}, line 2: ')
  assert not os.path.exists(workdir)


def test_model_option_values_are_checked_before_the_data_loads(tmp_path):
  """A bad option value fails at once, not after a download or a folder's decoding: here
  the data directory does not even exist."""
  line = _last_line(
    'train.py',
    '--config=experiment:model=resnet18',
    f'--workdir={tmp_path / "run"}',
    '--config.data.source=idx',
    f'--config.data.idx_dir={tmp_path / "no_data_here"}',
    '--config.model.options.stem=bogus',
  )
  assert line == (
    "error: config.model.options={'stem': 'bogus'}: resnet18: stem must be one of "
    "('small', 'imagenet'), got 'bogus'"
  )


def test_workdir_errors_are_one_line(idx_dir, tmp_path):
  data = [
    '--config.data.source=idx',
    f'--config.data.idx_dir={idx_dir}',
    '--config.data.val_size=40',
  ]
  empty = tmp_path / 'empty'
  empty.mkdir()
  line = _last_line('eval.py', '--config=experiment:model=simple_cnn', f'--workdir={empty}', *data)
  assert line == (
    f'error: no best checkpoint in {empty}/checkpoints_best: no validation has run in {empty} '
    'yet (train it with train.py --workdir=..., or evaluate its latest train state with '
    '--config.eval.checkpoint=last).'
  )
  line = _last_line(
    'eval.py',
    '--config=experiment:model=simple_cnn',
    f'--workdir={empty}',
    *data,
    '--config.eval.checkpoint=last',
  )
  assert line.startswith(f'error: no checkpoint in {empty}/checkpoints: nothing has been trained')
  a_file = tmp_path / 'notes.txt'
  a_file.write_text('mine')
  line = _last_line(
    'train.py', '--config=experiment:model=simple_cnn', f'--workdir={a_file}', *data
  )
  assert line == f'error: --workdir={a_file}: a file, not a directory; give a new or existing one.'
  assert a_file.read_text() == 'mine'
  # A start that fails after the workdir was made (the batch is larger than the data)
  # leaves none behind.
  new = tmp_path / 'new'
  line = _last_line(
    'train.py',
    '--config=experiment:model=simple_cnn',
    f'--workdir={new}',
    *data,
    '--config.train.batch_size=1000',
  )
  assert line == 'error: config.train.batch_size=1000 is larger than the train split (200 images).'
  assert not new.exists()


def test_constant_prototype_maps_warn_with_their_classes(tmp_path, caplog):
  maps = np.random.default_rng(0).uniform(size=(4, 6, 6))
  maps[1] = 0.5
  maps[3] = 0.0
  path = str(tmp_path / 'protos.npy')
  np.save(path, maps)
  with caplog.at_level(logging.WARNING):
    out = prototypes.file_prototypes(path, 4, 6)
  assert f'data.prototypes_file {path}: the maps of class(es) 1, 3 are constant' in caplog.text
  assert not out[1].any() and not out[3].any() and out[0].max() == 1.0


@pytest.mark.parametrize('script', ['train.py', 'eval.py'])
def test_help_exits_zero(script):
  proc = entry_points.run(script, '--help', check=True, timeout=120)
  assert '--config' in proc.stdout + proc.stderr


def test_the_tensorboard_hint_says_how_to_install_it(monkeypatch):
  from bcam_jax import metric_logging

  real = metric_logging.importlib.util.find_spec
  monkeypatch.setattr(
    metric_logging.importlib.util,
    'find_spec',
    lambda name: None if name == 'tensorboard' else real(name),
  )
  assert metric_logging.tensorboard_hint('w/tb') == (
    'TensorBoard files in w/tb (pip install tensorboard to view them)'
  )
  monkeypatch.setattr(metric_logging.importlib.util, 'find_spec', lambda name: object())
  assert metric_logging.tensorboard_hint('w/tb') == 'TensorBoard: tensorboard --logdir w/tb'


def test_a_size_error_names_the_option_that_fixes_it(idx_dir, tmp_path):
  """ResNet-18's ImageNet stem leaves a 1x1 CAM map at 28 px: the error gives the size that
  works and the option that works at this size."""
  from bcam_jax import config_validation, train_lib
  from bcam_jax.configs import experiment

  config = experiment.get_config('model=resnet18,loss=bcpl')
  config.model.options.stem = 'imagenet'
  config.data.source, config.data.idx_dir, config.data.val_size = 'idx', idx_dir, 40
  with pytest.raises(
    config_validation.ConfigError,
    match=r"image_size=28 gives resnet18\(stem='imagenet'\) a 1x1 CAM map; .*image_size >= 33, "
    r"or config.model.options.stem='small' \(a larger CAM map\)\.$",
  ):
    train_lib.train_and_evaluate(config, str(tmp_path / 'run'))


def test_eval_py_uses_the_config_recorded_in_the_workdir(idx_dir, tmp_path):
  """A run trained with overrides (32 px images, which a config without them would refuse
  as another run's) is evaluated with `--workdir` alone plus evaluation overrides; a
  workdir without config.json says so."""
  workdir = tmp_path / 'run'
  data = [
    '--config.data.source=idx',
    f'--config.data.idx_dir={idx_dir}',
    '--config.data.val_size=40',
  ]
  train = [
    '--config=experiment:model=simple_cnn',
    f'--workdir={workdir}',
    *data,
    '--config.data.image_size=32',
    '--config.train.num_steps=2',
    '--config.train.batch_size=8',
    '--config.eval.batch_size=40',
  ]
  entry_points.run('train.py', *train, check=True)
  evaluate = ['--config.eval.methods=grad_cam', '--config.eval.num_images=8']
  proc = entry_points.run(
    'eval.py', f'--workdir={workdir}', *evaluate, '--config.eval.checkpoint=last', check=True
  )
  assert f'Using the config recorded in {workdir}/config.json' in proc.stderr
  metrics = __import__('json').load(open(workdir / 'eval' / 'metrics.json'))
  assert metrics['step'] == 2 and list(metrics['methods']) == ['grad_cam']
  line = _last_line('eval.py', f'--workdir={tmp_path / "nothing"}')
  assert line == (
    f'error: {tmp_path / "nothing"}/config.json does not exist: give --workdir a training '
    "run's workdir, or --config=<the config it was trained with>"
  )


def test_a_long_pass_logs_its_progress_and_a_short_one_stays_quiet(monkeypatch, caplog):
  """`split_loop.Progress` with `quiet_below_s` (validation and test): nothing for a pass
  within the limit, lines with the count, rate and ETA for a longer one."""
  from bcam_jax import split_loop

  clock = {'now': 100.0}
  monkeypatch.setattr(split_loop.time, 'time', lambda: clock['now'])
  with caplog.at_level(logging.INFO):
    quick = split_loop.Progress('validation', 100, quiet_below_s=10.0)
    for done in (50, 100):
      clock['now'] += 1.0
      quick(done)
    assert 'validation' not in caplog.text
    slow = split_loop.Progress('test', 300, quiet_below_s=10.0)
    for done in (100, 200, 300):
      clock['now'] += 6.0
      slow(done)
  assert 'test: 200/300 images, 16.7 img/s, ETA' in caplog.text
  assert 'test: 300/300 images, 16.7 img/s' in caplog.text


def test_auto_source_says_nothing_of_the_sources_it_did_not_need(idx_dir, caplog, tmp_path):
  from bcam_jax import data

  spec = data.DataSpec(source='auto', idx_dir=idx_dir, val_size=40, tfds_data_dir=str(tmp_path))
  with caplog.at_level(logging.INFO):
    datasets = data.load_datasets(spec)
  assert datasets.source.startswith('IDX files in')
  assert 'unavailable' not in caplog.text
