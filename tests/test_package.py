"""The built wheel as a user gets it: console scripts that work from any directory, packaged
configs by name or a config file by path, the version.

The wheel is built from this clone and installed with --no-deps into a fresh venv whose
dependencies come from the running interpreter's site-packages (a .pth file, like
--system-site-packages over a venv), so the test needs no index for them. Every command runs
from a directory outside the clone with PYTHONPATH unset, so only the installed copy of
bcam_jax can be imported.
"""

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

from bcam_jax import __version__, configs
from tests import synthetic, test_download

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Builds and installs the wheel; the environment (PATH first) to run its commands with."""
  root = tmp_path_factory.mktemp('package')
  dist, prefix = root / 'dist', root / 'venv'
  subprocess.run(
    [sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w', str(dist), REPO],
    check=True,
    timeout=300,
  )
  (wheel,) = dist.glob('bcam_jax-*.whl')
  venv.create(prefix, with_pip=False)
  python = prefix / 'bin' / 'python'
  site = subprocess.run(
    [python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
    check=True,
    capture_output=True,
    text=True,
  ).stdout.strip()
  with open(os.path.join(site, 'dependencies.pth'), 'w', encoding='utf-8') as f:
    f.write(sysconfig.get_path('purelib') + '\n')
  subprocess.run(
    [sys.executable, '-m', 'pip', '--python', python, 'install', '-q', '--no-deps', wheel],
    check=True,
    timeout=300,
  )
  environ = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  return dict(environ, PATH=f'{prefix / "bin"}{os.pathsep}{environ["PATH"]}', JAX_PLATFORMS='cpu')


@pytest.fixture
def outside(tmp_path):
  """A working directory outside the clone."""
  directory = tmp_path / 'elsewhere'
  directory.mkdir()
  return directory


def run(env, cwd, *command, check=True):
  result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def train_flags(tmp_path, workdir):
  idx_dir = synthetic.write_dataset(str(tmp_path / 'idx'))
  return [
    f'--workdir={workdir}',
    '--config.data.source=idx',
    f'--config.data.idx_dir={idx_dir}',
    '--config.data.val_size=40',
    '--config.train.batch_size=8',
    '--config.train.num_steps=2',
    '--config.eval.batch_size=40',
  ]


def test_version_is_the_installed_one_and_import_is_cheap(env, outside):
  out = run(
    env,
    outside,
    'python',
    '-c',
    'import importlib.metadata, sys, bcam_jax; '
    'print(bcam_jax.__version__, importlib.metadata.version("bcam-jax"), '
    '"jax" in sys.modules, bcam_jax.__file__)',
  ).stdout.split()
  assert out[:3] == [__version__, __version__, 'False']
  assert not out[3].startswith(REPO), out[3]  # the installed copy, not the clone's


def test_console_scripts_are_installed_and_show_their_help(env, outside):
  for name in ('bcam-train', 'bcam-eval', 'bcam-reproduce', 'bcam-data', 'bcam-weights'):
    assert shutil.which(name, path=env['PATH']), name
  for name, flag in (('bcam-train', '--config'), ('bcam-eval', '--config.eval.methods')):
    help_text = run(env, outside, name, '--help', check=False).stdout
    assert flag in help_text and 'packaged' in help_text, help_text


def test_train_with_a_packaged_config_name_writes_results(env, outside, tmp_path):
  workdir = tmp_path / 'run'
  run(
    env,
    outside,
    'bcam-train',
    '--config=experiment:model=simple_cnn',
    *train_flags(tmp_path, workdir),
  )
  with open(workdir / 'results.json', encoding='utf-8') as f:
    assert 'test_accuracy' in json.load(f)


def test_train_with_a_config_file_by_path(env, outside, tmp_path):
  """A user's copy of a config, given by a path relative to the working directory."""
  shutil.copy(os.path.join(configs.DIRECTORY, 'experiment.py'), outside / 'my_config.py')
  workdir = tmp_path / 'run'
  flags = train_flags(tmp_path, workdir)
  run(env, outside, 'bcam-train', '--config=my_config.py:model=simple_cnn', *flags)
  assert (workdir / 'results.json').exists()


def test_unknown_config_name_lists_the_packaged_ones(env, outside):
  result = run(env, outside, 'bcam-train', '--config=resnet99', '--workdir=w', check=False)
  assert result.returncode != 0
  assert "'resnet99' is neither a config file nor a packaged config" in result.stderr
  assert all(name in result.stderr for name in configs.names()), result.stderr
  assert 'Traceback' not in result.stderr


def test_reproduce_lists_a_packaged_grid(env, outside):
  out = run(env, outside, 'bcam-reproduce', '--grid=grids/cpu_small', '--list').stdout
  assert len(out.splitlines()) == 7 * 2 * 3 + 2 + 2 * 3


def test_python_m_bcam_jax_reports_versions_devices_and_the_data_folder(env, outside, tmp_path):
  data_dir = tmp_path / 'data'
  env = dict(env, BCAM_DATA_DIR=str(data_dir), BCAM_DATA_MIRROR='http://127.0.0.1:9/')
  lines = run(env, outside, 'python', '-m', 'bcam_jax').stdout.splitlines()
  assert lines[0].startswith(f'bcam-jax {__version__} (') and REPO not in lines[0]
  assert any(line.startswith('jax ') for line in lines), lines
  assert 'devices: 1 x cpu (cpu)' in '\n'.join(lines)
  assert f'data folder: {data_dir} ($BCAM_DATA_DIR overrides)' in lines
  assert f'  mnist: {data_dir / "mnist"} (not cached: downloaded on first use)' in lines
  assert any(line.startswith('  mnist: http://127.0.0.1:9/mnist/') for line in lines), lines


def test_main_example_downloads_its_data_then_runs_offline_from_the_cache(env, outside, tmp_path):
  """The README's main command on a fresh HOME with the data behind $BCAM_DATA_MIRROR:
  the first run downloads (auto source) into the user cache, the second, with the mirror
  stopped, reads that cache. The generated files' checksums replace the pinned ones."""
  idx_dir = synthetic.write_dataset(str(tmp_path / 'served' / 'mnist'), compress=True)
  files = {
    f'/mnist/{name}': open(os.path.join(idx_dir, name), 'rb').read() for name in os.listdir(idx_dir)
  }
  pins = {}
  for name, body in files.items():
    pins[os.path.basename(name).removesuffix('.gz')] = hashlib.sha256(
      gzip.decompress(body)
    ).hexdigest()
  train = (
    'import sys; from bcam_jax.data import download as d; '
    f'd.SHA256 = {{"mnist": {pins!r}}}; d.MIRRORS = {{"mnist": ()}}; '
    'from bcam_jax.commands import train; sys.argv[0] = "bcam-train"; train.run()'
  )
  mirror = test_download.Mirror(files)
  home = tmp_path / 'home'
  env = dict(env, HOME=str(home), **{test_download.download.MIRROR_ENV: mirror.url})
  env.pop('XDG_CACHE_HOME', None)
  env.pop('BCAM_DATA_DIR', None)
  flags = ['--config=resnet18_bcpl', '--config.data.val_size=40', '--config.train.batch_size=8']
  flags += ['--config.train.num_steps=2', '--config.eval.batch_size=40']
  try:
    run(env, outside, 'python', '-c', train, *flags, f'--workdir={tmp_path / "first"}')
  finally:
    mirror.stop()
  cache = home / '.cache' / 'bcam_jax' / 'mnist'
  assert sorted(os.listdir(cache)) == sorted(os.path.basename(name) for name in files)
  run(env, outside, 'python', '-c', train, *flags, f'--workdir={tmp_path / "second"}')
  for workdir in ('first', 'second'):
    assert json.load(open(tmp_path / workdir / 'results.json'))['step'] == 2
