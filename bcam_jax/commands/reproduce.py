"""Runs a reproduction grid: `bcam-reproduce --grid=grids/cpu_small`.

The grid is a packaged one (`grids/cpu_small`, `grids/paper_table1`, `grids/paper_table2`) or
a grid file; in a clone, `python reproduce.py --grid=configs/grids/cpu_small.py` is the same.

Every cell (model x condition x dataset x image size x seed) trains and is evaluated in its
own workdir under --workdir; cells finished before are skipped, and an interrupted cell
resumes from its last checkpoint, so rerunning the same command continues the grid. The
aggregated results.md, results.csv and figures go to --results_dir (default
results/<grid name>). `--list` prints the cells without running anything.
"""

import os

import jax
from absl import app, flags, logging

from bcam_jax import cli, grids
from bcam_jax.configs import experiment
from bcam_jax.metric_logging import quiet_library_logs

_GRID = cli.define_config_flag('grid', 'Grid: a packaged name (grids/cpu_small) or a file.')
_WORKDIR = flags.DEFINE_string(
  'workdir', 'runs/reproduce', "Root of the cells' workdirs: <workdir>/<grid>/<cell>."
)
_RESULTS = flags.DEFINE_string(
  'results_dir', None, 'Where results.md/csv go; default results/<grid name>.'
)
_LIST = flags.DEFINE_bool('list', False, "Only list the grid's cells and which are done.")
flags.mark_flags_as_required(['grid'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  grid = _GRID.value
  root = os.path.join(_WORKDIR.value, grid.name)
  if _LIST.value:
    for cell in grids.expand(grid):
      done = os.path.exists(os.path.join(root, cell.name, 'cell.json'))
      print(f'{"done" if done else "todo"}  {cell.name}  ({cell.epochs} epoch(s))')
    return
  records, failures = grids.run_grid(grid, root, experiment.get_config)
  if jax.process_index() == 0 and records:
    results_dir = _RESULTS.value or os.path.join('results', grid.name)
    grids.write_results(grid, records, root, results_dir, failures)
    logging.info('wrote %s', os.path.join(results_dir, 'results.md'))
  if failures:
    raise SystemExit(
      f'{len(failures)} cell(s) failed: {", ".join(sorted(failures))}; '
      'rerun the same command to retry them'
    )


def run():
  """The `bcam-reproduce` console script and the clone's `python reproduce.py`."""
  cli.run_command(main, __name__)
