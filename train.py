"""Trains a model: `python train.py --config=configs/<name>.py --workdir=<dir>`.

Override any config field on the command line, e.g. `--config.data.name=fashion_mnist`.
Restarting with the same workdir resumes from its latest checkpoint.
"""
from absl import app, flags
from ml_collections import config_flags

from bcam_jax import train_lib
from bcam_jax.metric_logging import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, results.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
