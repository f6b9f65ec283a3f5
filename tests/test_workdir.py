"""A workdir survives what interrupted runs leave: a best checkpoint newer than the latest
train state, an unreadable newest checkpoint, a second process on the same workdir."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bcam_jax import checkpointing, config_validation, eval_lib, optim, train_lib, workdir_lock
from tests import synthetic
from tests.test_train import tiny_config


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  return synthetic.write_dataset(str(tmp_path_factory.mktemp('idx')))


def _config(idx_dir):
  """12 steps; train states at 10 and 12, one validation (the best checkpoint) at 12."""
  config = tiny_config(idx_dir, num_steps=12)
  config.train.eval_every_steps = 12
  return config


@pytest.fixture(scope='module')
def finished(idx_dir, tmp_path_factory):
  """An uninterrupted run: (workdir, final parameters)."""
  workdir = str(tmp_path_factory.mktemp('finished'))
  result = train_lib.train_and_evaluate(_config(idx_dir), workdir)
  return workdir, jax.device_get(result['state'].params)


def _copy(workdir, tmp_path) -> str:
  target = str(tmp_path / 'copy')
  shutil.copytree(workdir, target)
  return target


def _assert_bitwise(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_resume_replays_a_step_whose_best_checkpoint_exists(idx_dir, finished, tmp_path):
  """Killed after the step-12 validation saved the best model, before the step-12 train
  state: the restart resumes at 10, replays the validation at 12 and completes."""
  workdir = _copy(finished[0], tmp_path)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '12'))
  assert os.listdir(os.path.join(workdir, 'checkpoints_best')) == ['12']
  stale = os.path.join(workdir, '.results.jsonx1y2z3.tmp')  # left by a write killed midway
  open(stale, 'w').close()
  result = train_lib.train_and_evaluate(_config(idx_dir), workdir)
  assert result['step'] == 12 and result['best_checkpoint_step'] == 12
  _assert_bitwise(result['state'].params, finished[1])
  assert not os.path.exists(stale)
  # metrics.jsonl: what the first session logged past step 10 was dropped and replayed.
  before = _records(finished[0])
  after = _records(workdir)
  assert after == before
  assert len(set(after)) == len(after)


def _records(workdir):
  """(step, split, loss) of each metrics.jsonl line."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['split'], r.get('loss')) for r in map(json.loads, f)]


def _truncate_data(step_dir):
  path = max(glob.glob(os.path.join(step_dir, '**', 'd', '*'), recursive=True), key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _truncate_manifest(step_dir):
  for path in glob.glob(os.path.join(step_dir, '**', 'manifest.ocdbt'), recursive=True):
    with open(path, 'r+b') as f:
      f.truncate(10)


def _delete_metadata(step_dir):
  for path in glob.glob(os.path.join(step_dir, '**', '_METADATA'), recursive=True):
    os.remove(path)


@pytest.mark.parametrize('damage', [_truncate_data, _truncate_manifest, _delete_metadata])
def test_unreadable_newest_checkpoint_falls_back_to_the_previous(
  idx_dir, finished, tmp_path, damage, caplog
):
  workdir = _copy(finished[0], tmp_path)
  damage(os.path.join(workdir, 'checkpoints', '12'))
  result = train_lib.train_and_evaluate(_config(idx_dir), workdir)
  _assert_bitwise(result['state'].params, finished[1])  # resumed at 10, replayed 11-12
  moved = os.listdir(os.path.join(workdir, checkpointing.UNREADABLE_DIR))
  assert len(moved) == 1 and moved[0].startswith('12-')
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '12']
  assert any(
    '/12 cannot be restored' in r.getMessage() and 'Resuming from step 10' in r.getMessage()
    for r in caplog.records
  )


def test_no_restorable_checkpoint_is_a_clear_error(idx_dir, finished, tmp_path):
  workdir = _copy(finished[0], tmp_path)
  for step in ('10', '12'):
    _delete_metadata(os.path.join(workdir, 'checkpoints', step))
  with pytest.raises(
    checkpointing.NoUsableCheckpointError,
    match=rf'No train-state checkpoint in {workdir} .*step 12: .*step 10: '
    '.*Nothing was moved',
  ):
    train_lib.train_and_evaluate(_config(idx_dir), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '12']
  assert not os.path.exists(os.path.join(workdir, checkpointing.UNREADABLE_DIR))


def test_a_second_process_on_a_workdir_fails_at_once_naming_the_first(idx_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  holder = subprocess.Popen(
    [
      sys.executable,
      '-c',
      'import sys, time; from bcam_jax import workdir_lock\n'
      'with workdir_lock.locked(sys.argv[1]):\n  print("locked", flush=True); time.sleep(600)',
      workdir,
    ],
    stdout=subprocess.PIPE,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  try:
    assert holder.stdout.readline().strip() == 'locked'
    start = time.time()
    with pytest.raises(
      workdir_lock.WorkdirLockedError, match=rf'{workdir} is in use by process {holder.pid} on '
    ):
      train_lib.train_and_evaluate(tiny_config(idx_dir, num_steps=2), workdir)
    assert time.time() - start < 30
    assert not os.path.exists(os.path.join(workdir, 'config.json'))  # nothing written
  finally:
    holder.kill()
    holder.wait()
    holder.stdout.close()
  # SIGKILL released the lock: the workdir is usable at once.
  with workdir_lock.locked(workdir):
    pass


def test_another_model_on_a_workdir_fails_before_writing(idx_dir, finished, tmp_path):
  workdir = _copy(finished[0], tmp_path)
  recorded = open(os.path.join(workdir, 'config.json')).read()
  config = _config(idx_dir)
  config.model.name = 'resnet18'
  config.data.image_size = 32
  config.model.conv_lowering = 'xla'  # speed only: not a difference
  expected = (
    r'was trained with another model or data than this config \(data.image_size: '
    r"28 in the workdir, 32 now; model.name: 'simple_cnn' in the workdir, "
    r"'resnet18' now\)\. Use the config it was trained with, or a new --workdir\."
  )
  with pytest.raises(config_validation.ConfigError, match=expected):
    train_lib.train_and_evaluate(config, workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == recorded
  with pytest.raises(config_validation.ConfigError, match=expected):
    eval_lib.restore(config, workdir, 'last')
  with pytest.raises(FileNotFoundError, match='is a file, not a directory'):
    eval_lib.restore(_config(idx_dir), os.path.join(workdir, 'config.json'), 'last')
  fewer_steps = _config(idx_dir)
  fewer_steps.train.num_steps = 10  # the workdir's latest checkpoint is at step 12
  with pytest.raises(
    config_validation.ConfigError, match=r'is at step 12, beyond this config\'s 10 steps'
  ):
    train_lib.train_and_evaluate(fewer_steps, workdir)


def test_a_model_option_at_its_default_is_the_option_left_out(idx_dir, tmp_path):
  config = _config(idx_dir)
  config.model.name = 'resnet18'
  config.model.options = {'width': 8}
  with open(tmp_path / 'config.json', 'w') as f:
    f.write(config.to_json())
  config.model.options = {'width': 8, 'stem': 'small', 'dtype': 'float32'}  # the defaults
  config_validation.check_matches_workdir(config, str(tmp_path))
  config.model.options.batch_norm = 'custom_vjp'  # speed only: not a difference
  config_validation.check_matches_workdir(config, str(tmp_path))
  config.model.options.stem = 'imagenet'
  expected = "model.options.stem: 'small' in the workdir, 'imagenet' now"
  with pytest.raises(config_validation.ConfigError, match=re.escape(expected)):
    config_validation.check_matches_workdir(config, str(tmp_path))


def test_entry_points_report_user_errors_without_a_traceback(idx_dir, finished):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  common = [
    '--config=configs/experiment.py:model=simple_cnn',
    f'--workdir={finished[0]}',
    '--config.data.source=idx',
    f'--config.data.idx_dir={idx_dir}',
  ]
  for script, extra, message in (
    ('train.py', ['--config.data.name=cifar'], "error: config.data.name='cifar' is not valid"),
    ('eval.py', ['--config.model.name=resnet18'], 'error: .* was trained with another model'),
    (
      'eval.py',
      ['--config.data.val_size=40', '--config.eval.methods=cam'],
      'error: config.eval.methods: simple_cnn has no global-average-pool',
    ),
    (
      'eval.py',
      ['--config.eval.n_steps=25', '--config.eval.pixels_per_step=28'],
      'error: config.eval: n_steps=25 and pixels_per_step=28: give one',
    ),
    (
      'eval.py',
      ['--methods=cam', '--road'],
      r'error: --methods=cam is now --config.eval.methods=cam; --road is now '
      r'--config.eval.road=True \(every evaluation option is a config.eval field\)\.',
    ),
  ):
    proc = subprocess.run(
      [sys.executable, script, *common, *extra],
      cwd=repo,
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr


def test_resumed_logger_drops_what_it_will_replay(tmp_path):
  from tensorboardX.proto import event_pb2

  from bcam_jax.metric_logging import MetricLogger

  workdir = str(tmp_path)
  logger = MetricLogger(workdir)
  for step in (5, 10, 15):
    logger.write(step, 'train', {'loss': step})
  logger.write(15, 'test', {'loss': 0.0})
  logger.close()
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 20, "spl')  # torn by a kill
  MetricLogger(workdir, resumed_step=10).close()
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert [(r['step'], r['split']) for r in map(json.loads, f)] == [(5, 'train'), (10, 'train')]
  # TensorBoard: the new event file starts with a purge of steps > 10.
  purges = []
  for name in os.listdir(os.path.join(workdir, 'tensorboard')):
    raw = open(os.path.join(workdir, 'tensorboard', name), 'rb').read()
    pos = 0
    while pos < len(raw):  # TFRecord framing: length, crc, payload, crc
      length = int.from_bytes(raw[pos : pos + 8], 'little')
      event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length])
      if event.HasField('session_log') and event.session_log.status == event.session_log.START:
        purges.append(event.step)
      pos += 16 + length
  assert purges == [11]


def test_unwritable_or_missing_workdir_is_named(tmp_path, monkeypatch):
  missing = str(tmp_path / 'none')
  with pytest.raises(workdir_lock.WorkdirError, match=f'workdir {missing} is not a directory'):
    with workdir_lock.locked(missing):
      pass

  def refuse(*args, **kwargs):
    raise PermissionError(13, 'Permission denied')

  monkeypatch.setattr(workdir_lock.os, 'open', refuse)  # as root, chmod would not stop us
  with pytest.raises(workdir_lock.WorkdirError, match=f'workdir {tmp_path} is not writable'):
    with workdir_lock.locked(str(tmp_path)):
      pass


KILL_MOMENTS = [
  ('startup', 0),
  ('validation', 12),
  ('save', 16),
  ('save_best', 12),
  ('after_validation', 12),
]


def _train_args(idx_dir, workdir):
  """24 steps of 8; train states at 8, 16, 24; validations (best checkpoints) at 12, 24."""
  return [
    '--config=configs/experiment.py:model=simple_cnn',
    f'--workdir={workdir}',
    '--config.data.source=idx',
    f'--config.data.idx_dir={idx_dir}',
    '--config.data.val_size=40',
    '--config.train.batch_size=8',
    '--config.train.num_steps=24',
    '--config.train.checkpoint_every_steps=8',
    '--config.train.eval_every_steps=12',
    '--config.train.log_every_steps=4',
    '--config.eval.batch_size=40',
  ]


def _run(args, **kwargs):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
    [sys.executable, *args],
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    **kwargs,
  )


def _final(workdir):
  """(final parameters, (step, split) of every metrics.jsonl line)."""
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    assert manager.latest_step() == 24
    params = manager.restore(24)['params']
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [(r['step'], r['split']) for r in map(json.loads, f)]
  return params, lines


@pytest.fixture(scope='module')
def uninterrupted(idx_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  proc = _run(['train.py', *_train_args(idx_dir, workdir)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return _final(workdir)


@pytest.mark.parametrize('signal_name', ['SIGKILL', 'SIGINT'])
@pytest.mark.parametrize('moment,step', KILL_MOMENTS)
def test_killed_train_py_restarts_to_the_uninterrupted_run(
  idx_dir, tmp_path, uninterrupted, moment, step, signal_name
):
  """A real train.py killed at `moment`, then restarted: the restart completes, ends
  bitwise where an uninterrupted run ends, and metrics.jsonl holds each step once."""
  workdir = str(tmp_path / 'run')
  killed = _run(
    ['tests/kill_at.py', moment, str(step), signal_name, *_train_args(idx_dir, workdir)]
  )
  assert killed.returncode != 0, killed.stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, 'results.json'))  # it did not finish
  restarted = _run(['train.py', *_train_args(idx_dir, workdir)])
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  params, lines = _final(workdir)
  _assert_bitwise(params, uninterrupted[0])
  assert lines == uninterrupted[1]


def test_evaluation_restores_the_last_variables_without_an_optimizer(
  idx_dir, finished, monkeypatch
):
  workdir, final_params = finished

  def no_optimizer(*args, **kwargs):
    raise AssertionError('restoring model variables must not build an optimizer')

  monkeypatch.setattr(optim, 'make_optimizer', no_optimizer)
  _, variables, step = eval_lib.restore(_config(idx_dir), workdir, 'last')
  assert step == 12
  assert set(variables) == {'params'}  # simple_cnn has no BatchNorm statistics
  _assert_bitwise(variables['params'], final_params)
