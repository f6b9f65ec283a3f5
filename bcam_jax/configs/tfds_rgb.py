"""ResNet18 with the Batch-CAM Prototype Loss (BCPL) on a TFDS colour dataset: CIFAR-10.

Any TFDS image-classification dataset works by name (data.source='tfds' with a data.name
other than mnist / fashion_mnist): its class names, channel count and splits come from the
dataset's info; images are resized (shorter side) and centre-cropped to data.image_size;
the validation split is the dataset's 'validation' when it also has a 'test', else
data.val_size train images (data.split_seed); a dataset without 'test' (e.g. imagenette)
is tested on its 'validation' split, as the log says. The inputs are normalised by the
per-channel mean and std of the train split, computed once and cached in
<workdir>/data_stats.json; the prototypes are the grayscale of each class's mean image
(--config.data.prototypes=channels or =file with data.prototypes_file for others).

Prepare first (once, with network access; preparing needs TensorFlow, reading does not):
  pip install "bcam-jax[tfds-prepare]"
  python -c "import tensorflow_datasets as tfds; tfds.builder('cifar10', \
      data_dir='~/tensorflow_datasets').download_and_prepare(file_format='array_record')"
(train.py also prepares it itself when TensorFlow is installed and the network reachable.)

Run:
  python train.py --config=configs/tfds_rgb.py --workdir=runs/cifar10_bcpl \
      [--config.data.tfds_data_dir=~/tensorflow_datasets] [--config.data.name=imagenette \
      --config.data.image_size=112]
  python eval.py --config=configs/tfds_rgb.py --workdir=runs/cifar10_bcpl \
      [the same --config.data flags]

Expected: the 32x32 CIFAR-10 images give a 4x4 CAM map; 30 epochs reach a test accuracy far
above chance (10 %) with a test Batch-CAM loss that falls during training (results.json).
This is a working start, not a tuned CIFAR-10 recipe (no augmentation yet).
"""

from bcam_jax.configs import experiment


def get_config():
  config = experiment.get_config('model=resnet18,loss=bcpl')
  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.data.image_size = 32
  config.data.val_size = 5000  # from train: cifar10 has no 'validation' split
  config.train.batch_size = 128
  config.train.num_epochs = 30
  config.eval.batch_size = 500
  return config
