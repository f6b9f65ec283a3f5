"""The MNIST and Fashion-MNIST IDX files fetched over HTTP(S) with the standard library, so a
fresh machine needs neither TensorFlow nor a prepared TFDS copy.

Each file comes from the first mirror that serves it intact: ``$BCAM_DATA_MIRROR`` when set
(a base URL serving ``<name>/<IDX file>.gz``, the layout of a ``bcam-data download`` folder),
then the public mirrors TFDS and torchvision use. A file is accepted only when the SHA-256 of
its decompressed content matches the pinned value, so a mirror that serves it uncompressed or
recompressed is accepted and a corrupt or different one is not. Files are written
atomically (temporary file + rename) into ``$BCAM_DATA_DIR/<name>/`` when set, else
``${XDG_CACHE_HOME:-~/.cache}/bcam_jax/<name>/``; a killed download leaves only a hidden
``.tmp`` file, which no reader takes for the data.
"""

import gzip
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
import zlib

from bcam_jax.data.dataset import DATA_DIR_ENV, DataError, dataset_info
from bcam_jax.data.idx import IDX_FILES, find_idx_file
from bcam_jax.io_utils import atomic_write

MIRROR_ENV = 'BCAM_DATA_MIRROR'

# Base URLs of each dataset's files, in the order tried (after $BCAM_DATA_MIRROR).
MIRRORS: dict[str, tuple[str, ...]] = {
  'mnist': (
    'https://storage.googleapis.com/cvdf-datasets/mnist/',  # TFDS's
    'https://ossci-datasets.s3.amazonaws.com/mnist/',  # torchvision's
  ),
  'fashion_mnist': (
    'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',  # TFDS's and torchvision's
    'https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/',
  ),
}

# SHA-256 of each file's decompressed content (the standard distributions).
SHA256: dict[str, dict[str, str]] = {
  'mnist': {
    'train-images-idx3-ubyte': 'ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db',
    'train-labels-idx1-ubyte': '65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5',
    't10k-images-idx3-ubyte': '0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7',
    't10k-labels-idx1-ubyte': 'ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2',
  },
  'fashion_mnist': {
    'train-images-idx3-ubyte': 'c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888',
    'train-labels-idx1-ubyte': 'bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9',
    't10k-images-idx3-ubyte': '5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b',
    't10k-labels-idx1-ubyte': '0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34',
  },
}

TIMEOUT_S = 30  # per connection attempt and per read: a stalled mirror is given up on
ATTEMPTS_PER_MIRROR = 3  # transient failures (timeouts, resets, HTTP 5xx) are retried
RETRY_BACKOFF_S = 1.0  # the wait before retry k is k times this
_CHUNK = 1 << 16


def default_root() -> str:
  """The folder of the dataset folders: ``$BCAM_DATA_DIR`` when set (data the user placed
  or fetched ahead of time), else the user cache ``${XDG_CACHE_HOME:-~/.cache}/bcam_jax``."""
  root = os.environ.get(DATA_DIR_ENV)
  if root:
    return os.path.expanduser(root)
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(os.path.expanduser(cache), 'bcam_jax')


def dataset_dir(name: str, root: str | None = None) -> str:
  """The folder holding `name`'s IDX files: ``<root>/<name>``, root defaulting to `default_root`."""
  dataset_info(name)  # An unknown name is a DataError listing the valid ones.
  return os.path.join(os.path.expanduser(root) if root else default_root(), name)


def mirrors(name: str) -> list[str]:
  """Base URLs of `name`'s files in the order tried: ``$BCAM_DATA_MIRROR/<name>/`` first."""
  own = os.environ.get(MIRROR_ENV)
  return ([f'{own.rstrip("/")}/{name}/'] if own else []) + list(MIRRORS[dataset_info(name).name])


def offline_fix(name: str) -> str:
  """The one command that makes `name` loadable without network access here."""
  return (
    f'To fix: where there is network access run `bcam-data download --dataset={name} '
    f'--dest=DIR` (or `python -m bcam_jax.commands.data download ...`), copy DIR here and '
    f'set {DATA_DIR_ENV}=DIR.'
  )


def _verified_gzip(name: str, base: str, raw: bytes) -> bytes:
  """`raw` (gzip or plain IDX bytes) as gzip bytes, if its decompressed SHA-256 is the pin.

  Raises a DataError saying what is wrong (corrupt gzip stream, or which digest was found).
  """
  compressed = raw[:2] == b'\x1f\x8b'
  try:
    content = gzip.decompress(raw) if compressed else raw
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'corrupt gzip stream ({type(e).__name__}: {e})') from e
  digest = hashlib.sha256(content).hexdigest()
  expected = SHA256[name][base]
  if digest != expected:
    raise DataError(
      f'SHA-256 mismatch: {len(content)} bytes decompressed with digest {digest[:16]}..., '
      f'expected {expected[:16]}...'
    )
  return raw if compressed else gzip.compress(content, mtime=0)


def _cached_file_is_valid(name: str, directory: str, base: str) -> bool:
  """Whether the file a reader would take for `base` in `directory` is present and verified."""
  path = find_idx_file(directory, base)
  if path is None:
    return False
  try:
    with open(path, 'rb') as f:
      _verified_gzip(name, base, f.read())
  except (OSError, DataError):
    return False
  return True


def is_cached(name: str, root: str | None = None) -> bool:
  """Whether all four IDX files of `name` are in ``dataset_dir(name, root)``, each verified."""
  directory = dataset_dir(name, root)
  return all(_cached_file_is_valid(name, directory, base) for base in IDX_FILES.values())


def _bytes(n: float) -> str:
  """A byte count for people: 512 B, 28.9 kB, 9.6 MB."""
  for unit, scale in (('MB', 1e6), ('kB', 1e3)):
    if n >= scale:
      return f'{n / scale:.1f} {unit}'
  return f'{n:.0f} B'


class _Progress:
  """Bytes received and rate on stderr: redrawn in place on a terminal, a line every 10 s
  in a log, and a final line per file."""

  def __init__(self, label: str, total: int | None):
    self.label, self.total, self.received = label, total, 0
    self.tty = sys.stderr.isatty()
    self.start = self.shown = time.monotonic()

  def _line(self) -> str:
    elapsed = max(time.monotonic() - self.start, 1e-6)
    size = _bytes(self.received) + (f' of {_bytes(self.total)}' if self.total else '')
    return f'{self.label}: {size}, {_bytes(self.received / elapsed)}/s'

  def update(self, n: int) -> None:
    self.received += n
    now = time.monotonic()
    if now - self.shown >= (0.2 if self.tty else 10.0):
      self.shown = now
      sys.stderr.write(f'\r{self._line()}' if self.tty else f'{self._line()}\n')
      sys.stderr.flush()

  def done(self) -> None:
    sys.stderr.write(('\r' if self.tty else '') + self._line() + '\n')
    sys.stderr.flush()


def _fetch(url: str) -> bytes:
  """The body of `url`, with progress; a body shorter than its Content-Length is a
  ConnectionError (retried like a reset connection)."""
  request = urllib.request.Request(url, headers={'User-Agent': 'bcam-jax'})
  with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
    total = int(response.headers.get('Content-Length') or 0) or None
    progress = _Progress(url, total)
    chunks = []
    try:
      while chunk := response.read(_CHUNK):
        chunks.append(chunk)
        progress.update(len(chunk))
    except http.client.IncompleteRead as e:
      raise ConnectionError(f'connection closed mid-transfer ({e})') from e
    finally:
      progress.done()  # Also after a failure, so the next line starts on its own.
  body = b''.join(chunks)
  if total is not None and len(body) != total:
    raise ConnectionError(f'connection closed after {len(body)} of {total} bytes')
  return body


def _is_transient(error: Exception) -> bool:
  """Timeouts, dropped connections and server-side HTTP errors, which a retry may cure."""
  if isinstance(error, urllib.error.HTTPError):
    return error.code >= 500 or error.code == 429
  if isinstance(error, urllib.error.URLError):
    error = error.reason
  return isinstance(error, (TimeoutError, ConnectionError))


def _describe(error: Exception) -> str:
  """One line for an error of `_fetch`."""
  if isinstance(error, urllib.error.HTTPError):
    return f'HTTP {error.code} {error.reason}'
  if isinstance(error, urllib.error.URLError) and isinstance(error.reason, Exception):
    error = error.reason
  return f'{type(error).__name__}: {error}'


def _fetch_with_retries(url: str) -> bytes:
  """`_fetch`, retried up to ATTEMPTS_PER_MIRROR times while the failure is transient."""
  attempt = 1
  while True:
    try:
      return _fetch(url)
    except (OSError, http.client.HTTPException) as e:
      if attempt == ATTEMPTS_PER_MIRROR or not _is_transient(e):
        raise
    time.sleep(RETRY_BACKOFF_S * attempt)
    attempt += 1


def _from_mirror(name: str, mirror: str, base: str) -> bytes:
  """`base` as verified gzip bytes from one mirror: ``<base>.gz``, or ``<base>`` where the
  mirror has no ``.gz``. Raises a DataError of one line saying why not."""
  url = mirror + base + '.gz'
  try:
    try:
      raw = _fetch_with_retries(url)
    except urllib.error.HTTPError as e:
      if e.code != 404:
        raise
      url = mirror + base
      raw = _fetch_with_retries(url)
  except (OSError, http.client.HTTPException) as e:
    raise DataError(f'{url}: {_describe(e)}') from e
  try:
    return _verified_gzip(name, base, raw)
  except DataError as e:
    raise DataError(f'{url}: {e}') from e


def _download_file(name: str, directory: str, base: str) -> None:
  """Writes ``<directory>/<base>.gz`` from the first mirror serving it intact, atomically."""
  failures = []
  for mirror in mirrors(name):
    try:
      data = _from_mirror(name, mirror, base)
    except DataError as e:
      failures.append(f'    - {e}')
      continue
    path = os.path.join(directory, base + '.gz')
    atomic_write(path, lambda f: f.write(data))
    plain = os.path.join(directory, base)
    if os.path.exists(plain):  # An unverified plain file would shadow the verified one.
      os.remove(plain)
    return
  raise DataError(
    f'Could not download {name}/{base}.gz into {directory}: every mirror failed:\n'
    + '\n'.join(failures)
  )


def download_dataset(name: str, root: str | None = None) -> str:
  """Makes ``dataset_dir(name, root)`` hold the four verified IDX files of `name`.

  Files already there and verified are kept (no request is made); missing, truncated or
  corrupt ones are fetched again. Returns the folder. Raises a DataError naming the file
  and, one line each, why every mirror failed.
  """
  directory = dataset_dir(name, root)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise DataError(f'Cannot create the data folder {directory}: {e}') from e
  for base in IDX_FILES.values():
    if not _cached_file_is_valid(name, directory, base):
      _download_file(name, directory, base)
  return directory
