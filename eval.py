"""Evaluates a trained workdir on the test set:
`python eval.py --config=configs/<name>.py --workdir=<dir> [--checkpoint=last]`.
"""
from absl import app, flags
from ml_collections import config_flags

from bcam_jax import eval_lib
from bcam_jax.metric_logging import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file('config', None, 'The config used for training.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of the trained run.')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'best', list(eval_lib.CHECKPOINTS),
                                'Best-by-validation-accuracy or the last checkpoint.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  eval_lib.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value)


if __name__ == '__main__':
  app.run(main)
