"""Trains a model: `python train.py --config=configs/<name>.py --workdir=<dir>`.

Override any config field on the command line, e.g. `--config.data.name=fashion_mnist`.
Restarting with the same workdir resumes from its latest checkpoint. In a multi-process
(multi-host) job every process runs this same command; on Slurm and Cloud TPU VMs the
processes find each other by themselves, elsewhere pass --coordinator_address,
--num_processes and --process_id (see README, "Run on a cluster").
"""

from absl import app, flags
from ml_collections import config_flags

from bcam_jax import cli, distributed, train_lib
from bcam_jax.metric_logging import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, results.')
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0 in a multi-process job.'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0..num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(lambda argv: cli.run_main(main, argv))
