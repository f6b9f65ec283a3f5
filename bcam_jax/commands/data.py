"""Fetches datasets ahead of time, for machines without network access:

  bcam-data download --dataset=mnist --dataset=fashion_mnist --dest=DIR

(or `python -m bcam_jax.commands.data download ...`). DIR receives `<name>/` folders of
verified IDX files, the layout `$BCAM_DATA_DIR` expects: copy DIR to the offline machine and
set BCAM_DATA_DIR to it there. Without --dest the files go where training looks for them on
this machine ($BCAM_DATA_DIR, else ~/.cache/bcam_jax); files already there and verified are
not fetched again.
"""

import os

from absl import app, flags

from bcam_jax import cli, data

_DATASETS = flags.DEFINE_multi_enum(
  'dataset', sorted(data.DATASETS), sorted(data.DATASETS), 'Dataset to fetch (repeatable).'
)
_DEST = flags.DEFINE_string(
  'dest', None, 'Folder receiving <name>/ folders; default $BCAM_DATA_DIR, else the user cache.'
)


def main(argv):
  if argv[1:] != ['download']:
    raise app.UsageError(f'Expected the command `download`, got {argv[1:]}.')
  dest = os.path.abspath(os.path.expanduser(_DEST.value or data.default_root()))
  for name in _DATASETS.value:
    print(f'{name}: 4 verified IDX files in {data.download_dataset(name, dest)}')
  print(f'To use them on another machine: copy {dest} there and set {data.DATA_DIR_ENV}=<copy>.')


def run():
  """The `bcam-data` console script and `python -m bcam_jax.commands.data`."""
  cli.run_command(main, __name__)


if __name__ == '__main__':
  run()
