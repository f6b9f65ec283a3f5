"""Test set-up, before JAX starts its backend: eight fake CPU devices, one persistent
compilation cache for the whole run, XLA's CPU backend optimisation off, and the longest test
files first.

The cache is a directory this run creates (never the user's ~/.cache), shared through the
environment with every process a test starts (train.py, eval.py, the wheel's commands, the
multi-process jobs, the kill campaign) and with pytest-xdist's workers, so each distinct
program compiles once per run. It holds XLA's executables, so a hit runs the program a fresh
compile would have given: results, bitwise ones included, do not depend on it. The run removes
it at the end; `BCAM_TEST_KEEP_XLA_CACHE=<dir>` keeps one in `<dir>` across runs instead.
"""

import atexit
import os
import shutil
import tempfile

_CACHE_VAR = 'BCAM_TEST_XLA_CACHE'  # set by the first process of the run, read by the others

if _CACHE_VAR not in os.environ:
  keep = os.environ.get('BCAM_TEST_KEEP_XLA_CACHE')
  if keep:
    os.makedirs(keep, exist_ok=True)
    os.environ[_CACHE_VAR] = os.path.abspath(keep)
  else:
    os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix='bcam-tests-xla-')
    atexit.register(shutil.rmtree, os.environ[_CACHE_VAR], ignore_errors=True)
os.environ.update(
  JAX_COMPILATION_CACHE_DIR=os.environ[_CACHE_VAR],
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
)
if os.environ.get('BCAM_TEST_XLA_OPTIMIZE') != '1':
  _O0 = '--xla_backend_optimization_level=0'
  if _O0 not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_O0}'.strip()

import jax  # noqa: E402  (after the environment the processes tests start read)

# This process may have imported JAX before this file (a plugin such as bench.test_times), so
# it is configured directly too.
jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_compilation_cache_dir', os.environ[_CACHE_VAR])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

# By their minutes in bench/README.md ("The test suite's time"), longest first; the others
# follow in the order collected.
SLOWEST_FILES = (
  'test_train.py',
  'test_finetune.py',
  'test_conv.py',
  'test_workdir.py',
  'test_explain_models.py',
  'test_self_explaining.py',
  'test_models.py',
  'test_eval.py',
  'test_cam_methods.py',
  'test_multiprocess.py',
  'test_package.py',
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
