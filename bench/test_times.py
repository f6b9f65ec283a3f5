"""Where the test suite's time goes: a pytest plugin that times every test file and the share
of it spent compiling in the pytest process.

  python -m pytest -q -p bench.test_times [--test_times_json=bench/results/test_times.json]

At the end it prints, per test file, the tests run, the wall minutes (setup, call and
teardown of each test, module fixtures included) and the minutes JAX spent lowering to
StableHLO and compiling with XLA (or reading XLA's persistent cache) in the pytest process,
and writes the same per test to JSON with the machine. Compiles inside the processes that
tests start (train.py, eval.py, the kill campaign) count in the file's wall time only. It
works under pytest-xdist: each worker measures its tests and the controller adds them up.
"""

import collections
import json
import os
import time

import jax
import pytest

from bench import common

_EVENTS = {
  '/jax/core/compile/backend_compile_duration': 'compile_s',
  '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower_s',
}
_spent = collections.Counter()  # this process's seconds per event, since it started
_rows = {}  # nodeid -> {'file', 'wall_s', 'compile_s', 'lower_s'}: the controller's table


def _listen(event, duration_secs, **kwargs):
  if event in _EVENTS:
    _spent[_EVENTS[event]] += duration_secs


jax.monitoring.register_event_duration_secs_listener(_listen)


def pytest_addoption(parser):
  parser.addoption(
    '--test_times_json',
    default=os.path.join('bench', 'results', 'test_times.json'),
    help='where bench.test_times writes its per-test figures',
  )


def pytest_runtest_setup(item):
  item._compile_start = dict(_spent)


@pytest.hookimpl(tryfirst=True)  # before the report is made from item.user_properties
def pytest_runtest_makereport(item, call):
  """Attaches the compile seconds since setup to the teardown report (which reaches the
  xdist controller with its user_properties)."""
  if call.when == 'teardown':
    start = getattr(item, '_compile_start', {})
    for key in _EVENTS.values():
      item.user_properties.append((key, _spent[key] - start.get(key, 0.0)))


def pytest_runtest_logreport(report):
  row = _rows.setdefault(
    report.nodeid,
    {'file': report.nodeid.split('::')[0], 'wall_s': 0.0, 'compile_s': 0.0, 'lower_s': 0.0},
  )
  row['wall_s'] += report.duration
  if report.when == 'teardown':
    for key, value in report.user_properties:
      if key in _EVENTS.values():  # not what a test records with record_property
        row[key] = value


def pytest_terminal_summary(terminalreporter, config):
  if not _rows or hasattr(config, 'workerinput'):  # xdist workers leave the table to the controller
    return
  files = collections.defaultdict(collections.Counter)
  for row in _rows.values():
    files[row['file']].update(
      tests=1, wall_s=row['wall_s'], compile_s=row['compile_s'], lower_s=row['lower_s']
    )
  total = sum(files.values(), collections.Counter())
  write = terminalreporter.write_line
  write('')
  write(f'{"test file":<34} {"tests":>5} {"wall min":>9} {"compile min":>12} {"lower min":>10}')
  for name, f in sorted(files.items(), key=lambda kv: -kv[1]['wall_s']) + [('total', total)]:
    write(
      f'{name:<34} {f["tests"]:>5} {f["wall_s"] / 60:>9.2f} {f["compile_s"] / 60:>12.2f}'
      f' {f["lower_s"] / 60:>10.2f}'
    )
  path = config.getoption('test_times_json')
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  payload = {
    'machine': common.machine_info(),
    'date': time.strftime('%Y-%m-%d %H:%M'),
    'files': {k: dict(v) for k, v in files.items()},
    'tests': _rows,
  }
  with open(path + '.tmp', 'w') as f:
    json.dump(payload, f, indent=1)
  os.replace(path + '.tmp', path)
  write(f'wrote {path}')
