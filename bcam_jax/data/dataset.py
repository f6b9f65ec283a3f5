"""What a loaded dataset is: its static facts (`DatasetInfo`, the `DATASETS` catalogue),
its splits held in memory (`Split`, `Datasets`) and the error every loader raises."""

import dataclasses

import numpy as np

DATA_DIR_ENV = 'BCAM_DATA_DIR'
IMAGE_SIZE = 28  # Native resolution of both datasets.

# config.data.prototypes: how bcam_jax.prototypes makes the class prototypes (the luma of the
# class-mean image, its channels averaged, or maps from config.data.prototypes_file).
PROTOTYPE_KINDS = ('luma', 'channels', 'file')
# data.prototypes_from: each split's own images, or train and val pooled (one per class).
PROTOTYPE_SOURCES = ('split', 'pooled')


class DataError(ValueError):
  """Data cannot be found, read or used as asked; the message says what and where."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset: classes, channel count and normalisation constants.

  `mean` and `std` are in [0, 1] pixel units: one float for every channel (the literature
  constants of the MNIST family), or a tuple with one value per channel (an image folder's
  train statistics); `data.normalize` broadcasts either over the channel axis.
  """

  name: str
  num_classes: int
  mean: float | tuple[float, ...]
  std: float | tuple[float, ...]
  class_names: tuple[str, ...]
  channels: int = 1


DATASETS: dict[str, DatasetInfo] = {
  'mnist': DatasetInfo(
    name='mnist',
    num_classes=10,
    mean=0.1307,
    std=0.3081,
    class_names=tuple(str(d) for d in range(10)),
  ),
  'fashion_mnist': DatasetInfo(
    name='fashion_mnist',
    num_classes=10,
    mean=0.2860,
    std=0.3530,
    class_names=(
      'T-shirt/top',
      'Trouser',
      'Pullover',
      'Dress',
      'Coat',
      'Sandal',
      'Shirt',
      'Sneaker',
      'Bag',
      'Ankle boot',
    ),
  ),
}


# config.data.normalization: 'auto' is ImageNet's with pretrained weights, else 'dataset'.
NORMALIZATIONS = ('auto', 'dataset', 'imagenet')
# The mean and std torchvision's and timm's ImageNet weights were trained with, RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalized(info: DatasetInfo) -> DatasetInfo:
  """`info` with ImageNet's mean and std, what published weights expect. 1-channel data
  gets the mean of the three channels' values (0.449, 0.226): a grey image seen as three
  equal channels through a first conv summed over RGB (`models.pretrained`)."""
  if info.channels == 3:
    mean, std = IMAGENET_MEAN, IMAGENET_STD
  else:
    mean = (round(sum(IMAGENET_MEAN) / 3, 4),) * info.channels
    std = (round(sum(IMAGENET_STD) / 3, 4),) * info.channels
  return dataclasses.replace(info, mean=mean, std=std)


def dataset_info(name: str) -> DatasetInfo:
  """Returns the `DatasetInfo` of `name`, or a DataError listing the valid names."""
  try:
    return DATASETS[name]
  except KeyError:
    raise DataError(
      f'Unknown dataset {name!r}; valid names: {", ".join(sorted(DATASETS))}.'
    ) from None


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in memory: images (N, H, W, C) uint8 (MNIST: (N, 28, 28, 1)) and labels (N,)
  int32."""

  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if self.images.shape[0] != self.labels.shape[0]:
      raise DataError(f'Split has {self.images.shape[0]} images but {self.labels.shape[0]} labels.')

  def __len__(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class Datasets:
  """The three splits of one dataset, and a human-readable note of where they came from."""

  info: DatasetInfo
  train: Split
  val: Split
  test: Split
  source: str


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  """Raises a DataError when a label lies outside [0, num_classes)."""
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    i = int(np.argmax(bad))
    raise DataError(
      f'{where}: label out of range: expected values in [0, {num_classes}), '
      f'found {int(labels[i])} at index {i} ({int(bad.sum())} bad labels).'
    )
