"""Tests of the IDX downloader and the `bcam-data` command against real HTTP servers on
127.0.0.1 (standard library `http.server` in a thread) serving small generated IDX files
whose checksums replace the pinned ones. No test touches the network."""

import gzip
import hashlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from absl import app, flags
from absl.testing import flagsaver

from bcam_jax import data
from bcam_jax.commands import data as data_command
from bcam_jax.data import download
from tests.synthetic import idx_bytes, make_images
from tests.test_data import config, no_tfds_download  # noqa: F401 (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASES = tuple(data.IDX_FILES.values())


def _contents(seed: int = 0) -> dict[str, bytes]:
  """The four plain IDX files of a tiny learnable dataset: IDX file name -> bytes."""
  rng = np.random.default_rng(seed)
  files = {}
  for prefix, n in (('train', 30), ('t10k', 10)):
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    files[f'{prefix}-images-idx3-ubyte'] = idx_bytes(make_images(labels, seed))
    files[f'{prefix}-labels-idx1-ubyte'] = idx_bytes(labels)
  return files


CONTENT = _contents()


def _served(prefix: str = '', content: dict[str, bytes] = CONTENT) -> dict[str, bytes]:
  """URL path -> body: each file gzipped under its standard name, below `prefix`."""
  return {f'/{prefix}{base}.gz': gzip.compress(raw) for base, raw in content.items()}


class Mirror:
  """An HTTP server on 127.0.0.1 in a thread: serves `files` (URL path -> body), answers 404
  otherwise, logs each request's path, and can cut a body short (`truncate`: path -> count)
  or send half of it and then hang until stopped (`stall`: paths)."""

  def __init__(self, files: dict[str, bytes]):
    self.files, self.requests, self.truncate, self.stall = dict(files), [], {}, set()
    self.stopped = threading.Event()
    mirror = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        mirror.requests.append(self.path)
        body = mirror.files.get(self.path)
        if body is None:
          self.send_error(404)
          return
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if mirror.truncate.get(self.path, 0):
          mirror.truncate[self.path] -= 1
          body = body[: len(body) // 2]
        if self.path in mirror.stall:
          self.wfile.write(body[: len(body) // 2])
          self.wfile.flush()
          mirror.stopped.wait(60)
          return
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=self.server.serve_forever, daemon=True).start()
    self.url = f'http://127.0.0.1:{self.server.server_port}/'

  def stop(self):
    self.stopped.set()
    self.server.shutdown()
    self.server.server_close()


@pytest.fixture
def mirror_factory():
  """Starts Mirrors on demand; stops them all at the end of the test."""
  started = []

  def start(files):
    started.append(Mirror(files))
    return started[-1]

  yield start
  for mirror in started:
    mirror.stop()


def _closed_url() -> str:
  """The URL of a local port nobody listens on: every request is refused."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  return f'http://127.0.0.1:{port}/'


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
  """No real mirror, no user data folder or cache, the generated files' pins, fast retries."""
  for name in ('MIRRORS', 'SHA256', 'RETRY_BACKOFF_S'):
    monkeypatch.setattr(download, name, getattr(download, name))  # restored after the test
  pin()
  monkeypatch.setattr(download, 'TIMEOUT_S', 5)
  for name in (data.DATA_DIR_ENV, download.MIRROR_ENV):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))


def _use_mirrors(monkeypatch, *urls):
  monkeypatch.setitem(download.MIRRORS, 'mnist', urls)


def _assert_holds_content(directory):
  """`directory` holds exactly the four generated files, gzipped under their .gz names."""
  assert sorted(os.listdir(directory)) == sorted(base + '.gz' for base in BASES)
  for base in BASES:
    with gzip.open(os.path.join(directory, base + '.gz')) as f:
      assert f.read() == CONTENT[base]


def test_download_cache_hit_and_offline_second_run(tmp_path, monkeypatch, mirror_factory, capfd):
  mirror = mirror_factory(_served())
  _use_mirrors(monkeypatch, mirror.url)
  cache = tmp_path / 'cache' / 'bcam_jax' / 'mnist'
  assert download.default_root() == str(tmp_path / 'cache' / 'bcam_jax')
  assert not download.is_cached('mnist')
  assert download.download_dataset('mnist') == str(cache)
  _assert_holds_content(cache)
  assert sorted(mirror.requests) == sorted(f'/{base}.gz' for base in BASES)
  progress = capfd.readouterr().err
  assert re.search(
    rf'{mirror.url}train-images-idx3-ubyte.gz: ([\d.]+ kB) of \1, [\d.]+ [kM]?B/s\n', progress
  )
  # A cache hit makes no request.
  assert download.is_cached('mnist')
  assert download.download_dataset('mnist') == str(cache)
  assert len(mirror.requests) == 4
  # The second run, with the server stopped, reads the cache.
  mirror.stop()
  datasets = data.load_datasets(config(source='download', val_size=5))
  assert datasets.source == f'IDX files in {cache} (SHA-256 verified)'
  assert (len(datasets.train), len(datasets.val), len(datasets.test)) == (25, 5, 10)
  assert len(mirror.requests) == 4


def test_fallback_after_404_and_after_corrupt_files(tmp_path, monkeypatch, mirror_factory):
  empty = mirror_factory({})
  bad_content = dict(CONTENT, **{BASES[0]: CONTENT[BASES[0]][:-1] + b'\x07'})
  wrong = mirror_factory(_served(content=bad_content))
  broken_gzip = {path: body[:-10] for path, body in _served().items()}
  truncated = mirror_factory(broken_gzip)
  good = mirror_factory(_served())
  _use_mirrors(monkeypatch, empty.url, wrong.url, truncated.url, good.url)
  directory = download.download_dataset('mnist', root=str(tmp_path / 'root'))
  _assert_holds_content(directory)
  # The 404 mirror was asked for the .gz and the plain name of each file.
  assert empty.requests[:2] == [f'/{BASES[0]}.gz', f'/{BASES[0]}']
  # The mirror serving a wrong train-images file served the three others.
  assert wrong.requests == [f'/{base}.gz' for base in BASES]
  assert truncated.requests == [f'/{BASES[0]}.gz']
  assert good.requests == [f'/{BASES[0]}.gz']


def test_checksum_mismatch_on_every_mirror_is_an_error_and_leaves_no_file(
  tmp_path, monkeypatch, mirror_factory
):
  other = _served(content=_contents(seed=1))
  first, second = mirror_factory(other), mirror_factory(other)
  _use_mirrors(monkeypatch, first.url, second.url)
  root = tmp_path / 'root'
  with pytest.raises(data.DataError) as err:
    download.download_dataset('mnist', root=str(root))
  message = str(err.value)
  assert f'Could not download mnist/{BASES[0]}.gz into {root / "mnist"}' in message
  for mirror in (first, second):
    assert f'    - {mirror.url}{BASES[0]}.gz: SHA-256 mismatch: ' in message
  assert os.listdir(root / 'mnist') == []


def test_killed_or_truncated_downloads_are_redone(tmp_path, monkeypatch, mirror_factory):
  mirror = mirror_factory(_served())
  mirror.truncate[f'/{BASES[1]}.gz'] = 1  # The first transfer stops half-way: retried.
  _use_mirrors(monkeypatch, mirror.url)
  directory = tmp_path / 'root' / 'mnist'
  directory.mkdir(parents=True)
  served = _served()
  # A download killed mid-write leaves a hidden temporary file, never the final name.
  (directory / f'.{BASES[0]}.gzq1w2e3.tmp').write_bytes(served[f'/{BASES[0]}.gz'][:100])
  # A truncated final file, and a wrong plain file that would shadow the .gz.
  (directory / f'{BASES[2]}.gz').write_bytes(served[f'/{BASES[2]}.gz'][:-20])
  (directory / BASES[3]).write_bytes(CONTENT[BASES[3]][:-3])
  # One intact file, kept without a request.
  (directory / f'{BASES[1]}.gz').write_bytes(served[f'/{BASES[1]}.gz'])
  del mirror.truncate[f'/{BASES[1]}.gz']
  mirror.truncate[f'/{BASES[3]}.gz'] = 1
  download.download_dataset('mnist', root=str(tmp_path / 'root'))
  assert mirror.requests == [f'/{BASES[0]}.gz', f'/{BASES[2]}.gz'] + [f'/{BASES[3]}.gz'] * 2
  os.remove(directory / f'.{BASES[0]}.gzq1w2e3.tmp')
  _assert_holds_content(directory)


def test_a_mirror_that_keeps_cutting_transfers_short_is_left_after_bounded_retries(
  tmp_path, monkeypatch, mirror_factory
):
  flaky, good = mirror_factory(_served()), mirror_factory(_served())
  flaky.truncate[f'/{BASES[0]}.gz'] = 100
  _use_mirrors(monkeypatch, flaky.url, good.url)
  download.download_dataset('mnist', root=str(tmp_path))
  assert flaky.requests.count(f'/{BASES[0]}.gz') == download.ATTEMPTS_PER_MIRROR
  assert good.requests == [f'/{BASES[0]}.gz']
  _assert_holds_content(tmp_path / 'mnist')


@pytest.mark.parametrize('layout', ['plain body under the .gz name', 'plain name only'])
def test_uncompressed_files_are_accepted(tmp_path, monkeypatch, mirror_factory, layout):
  if layout == 'plain name only':
    files = {f'/{base}': raw for base, raw in CONTENT.items()}
  else:
    files = {f'/{base}.gz': raw for base, raw in CONTENT.items()}
  mirror = mirror_factory(files)
  _use_mirrors(monkeypatch, mirror.url)
  _assert_holds_content(download.download_dataset('mnist', root=str(tmp_path)))


def test_mirror_env_is_tried_first_and_data_dir_env_is_the_cache(
  tmp_path, monkeypatch, mirror_factory
):
  own = mirror_factory(_served(prefix='mnist/'))
  public = mirror_factory(_served())
  _use_mirrors(monkeypatch, public.url)
  monkeypatch.setenv(download.MIRROR_ENV, own.url.rstrip('/'))
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / 'data'))
  assert download.mirrors('mnist') == [f'{own.url}mnist/', public.url]
  assert download.download_dataset('mnist') == str(tmp_path / 'data' / 'mnist')
  _assert_holds_content(tmp_path / 'data' / 'mnist')
  assert sorted(own.requests) == sorted(f'/mnist/{base}.gz' for base in BASES)
  assert public.requests == []


@pytest.mark.usefixtures('no_tfds_download')
def test_auto_downloads_when_there_is_no_tfds_and_no_idx(tmp_path, monkeypatch, mirror_factory):
  mirror = mirror_factory(_served())
  _use_mirrors(monkeypatch, mirror.url)
  datasets = data.load_datasets(config(tfds_data_dir=str(tmp_path / 'tfds')))
  cache = tmp_path / 'cache' / 'bcam_jax' / 'mnist'
  assert datasets.source == f'IDX files in {cache} (SHA-256 verified)'
  assert len(datasets.test) == 10
  # The next run takes the cached IDX files without asking the mirror.
  mirror.stop()
  datasets = data.load_datasets(config(tfds_data_dir=str(tmp_path / 'tfds')))
  assert datasets.source == f'IDX files in {cache}'


@pytest.mark.usefixtures('no_tfds_download')
def test_offline_with_nothing_cached_lists_what_was_tried_and_the_fix(tmp_path, monkeypatch):
  urls = (_closed_url(), _closed_url())
  _use_mirrors(monkeypatch, *urls)
  with pytest.raises(data.DataError) as err:
    data.load_datasets(config(tfds_data_dir=str(tmp_path / 'tfds')))
  message = str(err.value)
  cache = tmp_path / 'cache' / 'bcam_jax' / 'mnist'
  for part in (
    "Could not load dataset 'mnist' (data.source=auto). Tried, in order:",
    '  - prepared TFDS: ',
    f'  - IDX files: Missing IDX files in {cache} (the directory does not exist)',
    f'  - download: Could not download mnist/{BASES[0]}.gz into {cache}: every mirror failed:',
    *(f'    - {url}{BASES[0]}.gz: ConnectionRefusedError: ' for url in urls),
    '  - TFDS download: ',
    'To fix: where there is network access run `bcam-data download --dataset=mnist --dest=DIR`',
    f'set {data.DATA_DIR_ENV}=DIR.',
  ):
    assert part in message
  assert os.listdir(cache) == []


def test_data_command_downloads_into_dest(tmp_path, monkeypatch, mirror_factory, capsys):
  mirror = mirror_factory(_served())
  _use_mirrors(monkeypatch, mirror.url)
  dest = tmp_path / 'dest'
  with flagsaver.flagsaver():
    argv = flags.FLAGS(['bcam-data', '--dataset=mnist', f'--dest={dest}', 'download'])
    data_command.main(argv)
    assert capsys.readouterr().out.splitlines() == [
      f'mnist: 4 verified IDX files in {dest / "mnist"}',
      f'To use them on another machine: copy {dest} there and set {data.DATA_DIR_ENV}=<copy>.',
    ]
    _assert_holds_content(dest / 'mnist')
    with pytest.raises(app.UsageError, match='Expected the command `download`'):
      data_command.main(['bcam-data', 'fetch'])
    monkeypatch.setitem(download.MIRRORS, 'fashion_mnist', (mirror.url,))
    mirror.stop()
    flags.FLAGS(['bcam-data', '--dataset=fashion_mnist', f'--dest={dest}'])
    with pytest.raises(data.DataError, match='Could not download fashion_mnist/'):
      data_command.main(['bcam-data', 'download'])


# `bcam-data` in a child process whose mirrors and pins are the generated ones.
_COMMAND = (
  'import sys; from bcam_jax.commands import data; from tests.test_download import pin;'
  "pin(); sys.argv = ['bcam-data', *sys.argv[1:]]; data.run()"
)


def _command(args, env, cwd):
  """Runs `bcam-data <args>` (see _COMMAND) to the end."""
  return subprocess.run(
    [sys.executable, '-c', _COMMAND, *args], cwd=cwd, env=env, capture_output=True, text=True
  )


def pin():
  """No public mirror, and the generated files' pins (for a child process)."""
  download.MIRRORS = {'mnist': (), 'fashion_mnist': ()}
  pins = {base: hashlib.sha256(raw).hexdigest() for base, raw in CONTENT.items()}
  download.SHA256 = {'mnist': pins, 'fashion_mnist': pins}
  download.RETRY_BACKOFF_S = 0.0


def test_data_command_in_a_process_with_the_mirror_env(tmp_path, mirror_factory):
  mirror = mirror_factory(_served(prefix='mnist/'))
  env = dict(os.environ, **{download.MIRROR_ENV: mirror.url, 'PYTHONPATH': REPO})
  dest = tmp_path / 'dest'
  proc = _command(['download', '--dataset=mnist', f'--dest={dest}'], env, tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert f'mnist: 4 verified IDX files in {dest / "mnist"}' in proc.stdout
  assert f'{mirror.url}mnist/train-images-idx3-ubyte.gz: ' in proc.stderr
  _assert_holds_content(dest / 'mnist')
  mirror.stop()
  proc = _command(['download', '--dataset=mnist', f'--dest={tmp_path / "other"}'], env, tmp_path)
  assert proc.returncode == 1
  assert 'error: Could not download mnist/train-images-idx3-ubyte.gz' in proc.stderr
  assert f'    - {mirror.url}mnist/train-images-idx3-ubyte.gz: ConnectionRefusedError' in (
    proc.stderr
  )
  assert 'Traceback' not in proc.stderr
  # The `python -m` form runs the same command.
  proc = subprocess.run(
    [sys.executable, '-m', 'bcam_jax.commands.data', 'fetch'],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 1 and 'Expected the command `download`' in proc.stderr


def test_a_killed_download_leaves_no_file_that_looks_complete(tmp_path, mirror_factory):
  mirror = mirror_factory(_served(prefix='mnist/'))
  stalled = f'/mnist/{BASES[0]}.gz'
  mirror.stall.add(stalled)
  env = dict(os.environ, **{download.MIRROR_ENV: mirror.url, 'PYTHONPATH': REPO})
  dest = tmp_path / 'dest'
  args = ['download', '--dataset=mnist', f'--dest={dest}']
  child = subprocess.Popen(
    [sys.executable, '-c', _COMMAND, *args], cwd=tmp_path, env=env, stderr=subprocess.PIPE
  )
  deadline = time.monotonic() + 120
  while stalled not in mirror.requests and child.poll() is None and time.monotonic() < deadline:
    time.sleep(0.1)
  time.sleep(0.5)  # The child is now blocked half-way through the transfer.
  child.kill()
  child.communicate()
  assert mirror.requests == [stalled]
  assert not [name for name in os.listdir(dest / 'mnist') if not name.startswith('.')]
  mirror.stall.clear()
  proc = _command(args, env, tmp_path)
  assert proc.returncode == 0, proc.stderr
  _assert_holds_content(dest / 'mnist')
