"""ResNet18 with the Batch-CAM Prototype Loss (BCPL) on an image folder of your own.

The folder is in torchvision's ImageFolder layout: <root>/train/<class>/*.{png,jpg,jpeg},
<root>/test/<class>/... and optionally <root>/val/<class>/... (without it, data.val_size
train images, chosen by data.split_seed, become the validation split). Class names are the
folder names; grey or colour images are read in memory with Pillow, resized (shorter side)
and centre-cropped to data.image_size, normalised by the per-channel mean and std of the
train split. The prototypes are the grayscale of each class's mean image.

Run:
  python train.py --config=configs/image_folder.py --workdir=runs/my_folder \
      --config.data.folder_dir=/path/to/root [--config.data.name=my_data] \
      [--config.data.image_size=224] [--config.loss.metric=ssim]
  python eval.py --config=configs/image_folder.py --workdir=runs/my_folder \
      --config.data.folder_dir=/path/to/root

Expected: the run learns the classes (test accuracy in results.json well above chance,
1 / number of classes) with a test Batch-CAM loss that falls during training; eval.py writes
the confusion matrix, the prototypes beside the mean Grad-CAM of each class and RGB overlays
to <workdir>/eval/. How high the accuracy gets depends on the data: a few hundred images per
class and 20 epochs is a small, quick start, not a tuned recipe.
"""

from bcam_jax.configs import experiment


def get_config():
  config = experiment.get_config('model=resnet18,loss=bcpl')
  config.data.source = 'folder'
  config.data.name = 'image_folder'
  config.data.folder_dir = ''  # required: --config.data.folder_dir=<root>
  config.data.image_size = 112
  config.data.val_size = 500  # used only when the folder has no val split
  config.model.options.stem = 'imagenet'  # a 4x4 CAM map at 112 px, 7x7 at 224
  config.train.batch_size = 64
  config.train.num_epochs = 20
  config.eval.batch_size = 100
  return config
