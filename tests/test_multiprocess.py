"""Multi-process data parallelism with real processes: 2 train.py processes joined by
`jax.distributed` (loopback coordinator, gloo collectives, 2 CPU devices each) against one
process with 4 devices and with 1 device, and a killed 2-process job resumed.

The runs compute in float64 (`JAX_ENABLE_X64=1`): different process and device layouts sum
in different orders, and in float32 that rounding can flip a ReLU's gradient and grow
(`bench/mesh_drift.py`), so cross-layout results are compared where rounding is 1e-16.
A killed and resumed job has the layout of the uninterrupted one, so those two are compared
bit for bit.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bcam_jax import eval_lib
from bcam_jax.configs import experiment
from tests import numerics, synthetic
from tests.test_train import REPO

NUM_STEPS = 24


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  return synthetic.write_dataset(str(tmp_path_factory.mktemp('idx')))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _cmd(idx_dir, workdir, num_steps=NUM_STEPS, checkpoint_every=8):
  """A tiny float64 BCPL run whose global batch (16) splits over 1, 4 or 2 x 2 devices."""
  return [
    sys.executable,
    'train.py',
    '--config=configs/experiment.py:model=simple_cnn,loss=bcpl',
    f'--workdir={workdir}',
    '--config.data.source=idx',
    f'--config.data.idx_dir={idx_dir}',
    '--config.data.val_size=40',
    '--config.train.batch_size=16',
    '--config.train.dtype=float64',
    f'--config.train.num_steps={num_steps}',
    '--config.train.log_every_steps=4',
    f'--config.train.checkpoint_every_steps={checkpoint_every}',
    '--config.train.eval_every_steps=8',
    '--config.eval.batch_size=24',
  ]


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(devices), JAX_ENABLE_X64='1')


def _start_job(cmd, num_processes=2, devices=2):
  port = _free_port()
  return [
    subprocess.Popen(
      cmd
      + [
        f'--coordinator_address=localhost:{port}',
        f'--num_processes={num_processes}',
        f'--process_id={i}',
      ],
      cwd=REPO,
      env=_env(devices),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(num_processes)
  ]


def _wait(procs, timeout=400):
  outputs = []
  for p in procs:
    out, _ = p.communicate(timeout=timeout)
    outputs.append(out)
    assert p.returncode == 0, out[-3000:]
  return outputs


def _kill(procs):
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
    p.wait()
    if p.stdout:
      p.stdout.close()


def _config(idx_dir):
  """The config of `_cmd`, to restore its checkpoints in this (8-device) process."""
  config = experiment.get_config('model=simple_cnn,loss=bcpl')
  config.data.source, config.data.idx_dir, config.data.val_size = 'idx', idx_dir, 40
  config.train.batch_size, config.eval.batch_size = 16, 24
  config.train.dtype = 'float64'
  return config


def _params(idx_dir, workdir, step=NUM_STEPS):
  """Final float64 parameters, restored onto one local device whatever the saving
  topology."""
  with jax.enable_x64(True):
    _, variables, saved_step = eval_lib.restore(
      _config(idx_dir), workdir, 'last', devices=jax.devices()[:1]
    )
    assert saved_step == step
    params = jax.device_get(variables['params'])
  assert all(p.dtype == np.float64 for p in jax.tree.leaves(params))
  return params


@pytest.fixture(scope='module')
def single_process_runs(idx_dir, tmp_path_factory):
  """The same run on one process with 4 devices and with 1 device."""
  runs = {}
  for devices in (4, 1):
    workdir = str(tmp_path_factory.mktemp(f'one_process_{devices}_devices'))
    subprocess.run(
      _cmd(idx_dir, workdir),
      cwd=REPO,
      env=_env(devices),
      check=True,
      capture_output=True,
      timeout=400,
    )
    runs[devices] = _params(idx_dir, workdir)
  return runs


@pytest.fixture(scope='module')
def two_process_run(idx_dir, tmp_path_factory):
  """The uninterrupted 2-process job: (workdir, console outputs of both processes)."""
  workdir = str(tmp_path_factory.mktemp('two_processes'))
  return workdir, _wait(_start_job(_cmd(idx_dir, workdir, checkpoint_every=4)))


def test_two_processes_train_the_parameters_of_one(idx_dir, two_process_run, single_process_runs):
  workdir, outputs = two_process_run
  assert 'Joined a 2-process job as process 0' in outputs[0]
  assert 'Joined a 2-process job as process 1' in outputs[1]
  two = _params(idx_dir, workdir)
  # Measured 1.1e-15 apart (float64 rounding over 24 steps).
  numerics.assert_trees_close(two, single_process_runs[4], rtol=1e-10)
  numerics.assert_trees_close(two, single_process_runs[1], rtol=1e-10)
  # Only process 0 writes logs and results; both log their progress to the console.
  assert 'step 24/24' in outputs[0]
  results = open(os.path.join(workdir, 'results.json')).read()
  assert '"num_processes": 2' in results and '"num_devices": 4' in results


def test_killed_two_process_job_resumes_to_the_same_parameters(idx_dir, tmp_path, two_process_run):
  workdir = str(tmp_path / 'killed')
  cmd = _cmd(idx_dir, workdir, checkpoint_every=4)
  procs = _start_job(cmd)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + 300
  try:
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if os.path.isdir(ckpt_dir) and any(d.isdigit() and int(d) >= 8 for d in os.listdir(ckpt_dir)):
        break
      time.sleep(0.05)
    assert all(p.poll() is None for p in procs), 'the job ended before it could be killed'
  finally:
    _kill(procs)
  saved = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()]
  assert saved and max(saved) < NUM_STEPS
  outputs = _wait(_start_job(cmd))
  assert 'Resumed from' in outputs[0]  # process 0 logs for the job
  # Same layout as the uninterrupted job, so the same sums in the same order: bit for bit.
  for a, b in zip(
    jax.tree.leaves(_params(idx_dir, workdir)),
    jax.tree.leaves(_params(idx_dir, two_process_run[0])),
  ):
    np.testing.assert_array_equal(a, b)


def test_settings_come_from_flags_or_environment_and_must_be_complete(monkeypatch):
  from bcam_jax import distributed

  for var in distributed.ENV.values():
    monkeypatch.delenv(var, raising=False)
  for var in ('SLURM_NTASKS', 'SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES', 'JAX_DISTRIBUTED_AUTODETECT'):
    monkeypatch.delenv(var, raising=False)
  assert distributed.initialize() is False  # a single-process run: nothing to join
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  assert distributed.settings(process_id=1) == {'num_processes': 2, 'process_id': 1}
  with pytest.raises(ValueError, match='coordinator_address missing'):
    distributed.initialize(process_id=1)
