"""Runs a reproduction grid: `python reproduce.py --grid=configs/grids/cpu_small.py`.

Every cell (model x condition x dataset x image size x seed) trains and is evaluated in its
own workdir under --workdir; cells finished before are skipped, and an interrupted cell
resumes from its last checkpoint, so rerunning the same command continues the grid. The
aggregated results.md, results.csv and figures go to --results_dir (default
results/<grid name>). `--list` prints the cells without running anything.
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from bcam_jax import grids
from bcam_jax.metric_logging import quiet_library_logs
from configs import experiment

_GRID = config_flags.DEFINE_config_file(
  'grid', None, 'Grid config file (configs/grids/*.py).', lock_config=True
)
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


if __name__ == '__main__':
  app.run(main)
