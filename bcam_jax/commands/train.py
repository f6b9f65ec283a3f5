"""Trains a model: `bcam-train --config=<config> --workdir=<dir>`.

<config> is a packaged config (`resnet18_bcpl`, `experiment:model=simple_cnn,loss=bcpl`, ...)
or a config file (`configs/resnet18_bcpl.py` in a clone, where `python train.py` is the same
command). Override any config field on the command line, e.g.
`--config.data.name=fashion_mnist`.

A linen model of your own: `--config.model.name=package.module:ClassName
--config.model.cam_layer=<the path of its CAM layer submodule>`
(docs/guides/train-your-model.md).

Fine-tune published weights (torchvision's ResNets, timm's ViT and ConvNeXt) on an image
folder at 224 px: `--config=finetune:bcpl` (or `finetune:ca_stream`, `finetune:softcam`)
`--config.data.folder_dir=<root> --config.init.pretrained=<.pth, .safetensors or a
bcam-weights convert directory>` (docs/guides/models.md, "Pretrained weights").

Restarting with the same workdir resumes from its latest checkpoint. In a multi-process
(multi-host) job every process runs this same command; on Slurm and Cloud TPU VMs the
processes find each other by themselves, elsewhere pass --coordinator_address,
--num_processes and --process_id (see docs/guides/parallel.md, "Run on a cluster").
"""

from absl import app, flags

from bcam_jax import cli, distributed, train_lib
from bcam_jax.metric_logging import quiet_library_logs
from bcam_jax.run_spec import RunSpec

_CONFIG = cli.define_config_flag('config', 'Training config: a packaged name or a file.')
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
  train_lib.train_and_evaluate(RunSpec.from_config(_CONFIG.value), _WORKDIR.value)


def run():
  """The `bcam-train` console script and the clone's `python train.py`."""
  cli.run_command(main, __name__)
