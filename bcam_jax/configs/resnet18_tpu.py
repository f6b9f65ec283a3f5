"""ResNet18 BCPL for a TPU pod slice or a GPU cluster: bfloat16 compute, global batch 1024.

Every host runs the same command (docs/guides/parallel.md, "Run on a cluster"); the global
batch is split over all devices of all hosts, so it must be a multiple of the total device count.

  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd bcam-jax && \
      BCAM_DATA_DIR=gs-fuse-or-local-copy python train.py \
      --config=configs/resnet18_tpu.py --workdir=/shared/runs/resnet18_tpu"

The learning rate follows the linear scaling rule from ResNet18's 0.1 at batch 128
(configs/experiment.py) to 0.8 at 1024, with a longer warm-up; parameters, BatchNorm and
the head stay float32. Expected: the accuracy of configs/resnet18_bcpl.py within a few
tenths.
"""

from bcam_jax.configs import resnet18_bcpl


def get_config():
  config = resnet18_bcpl.get_config()
  config.train.batch_size = 1024
  config.train.dtype = 'bfloat16'
  config.train.num_epochs = 10
  config.train.log_every_steps = 20
  config.eval.batch_size = 1024
  config.optimizer.learning_rate = 0.1 * 1024 / 128
  config.optimizer.warmup_steps = 200
  return config
