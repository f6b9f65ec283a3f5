"""ResNet18 (small-image stem: 3x3/1 conv, no max-pool), cross-entropy baseline.

Run:
  BCAM_DATA_DIR=../shared/data python train.py \
      --config=configs/resnet18_baseline.py --workdir=runs/resnet18_mnist

Expected: >= 99.0% MNIST test accuracy after one epoch (`--config.train.num_epochs=1`),
about 99.5% after 5; about 94% on Fashion-MNIST. The ImageNet stem (7x7/2 + max-pool) is
`--config.model.options.stem=imagenet` (CAM map 1x1 at 28x28: not useful for Grad-CAM).
"""

from configs import base


def get_config():
  config = base.get_base_config()
  config.model.name = 'resnet18'
  config.model.options.stem = 'small'
  config.optimizer.learning_rate = 0.1
  config.train.num_epochs = 5
  return config
