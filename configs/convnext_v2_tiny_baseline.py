"""ConvNeXt-V2-Tiny (depths 3-3-9-3, GRN, stem stride 1 for 28x28), cross-entropy baseline.

Run:
  BCAM_DATA_DIR=../shared/data python train.py \
      --config=configs/convnext_v2_tiny_baseline.py --workdir=runs/convnext_mnist

Expected: about 99.5% MNIST and 94% Fashion-MNIST test accuracy after 10 epochs (the
paper's best: 99.72 / 94.79). At 112x112 use the patchify stem to keep the cost of the
ImageNet model: `--config.data.image_size=112 --config.model.options.stem_stride=4`.
"""

from configs import base


def get_config():
  config = base.get_base_config()
  config.model.name = 'convnext_v2_tiny'
  config.model.options.stem_stride = 1
  config.model.options.drop_path_rate = 0.1
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.05
  config.optimizer.nesterov = False
  config.optimizer.warmup_steps = 200
  config.train.num_epochs = 10
  return config
