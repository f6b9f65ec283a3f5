"""Data: datasets held in memory, their splits, batches and on-device preprocessing.

The datasets are held in memory as uint8 numpy arrays (MNIST: 70,000 28x28 images; an
image folder: every image at ``data.image_size``, or, when too large, streamed from disk)
and fed to the jitted step batch by batch:

* `dataset`: `DatasetInfo`, the `DATASETS` catalogue, `Split`, `Datasets`, `DataError`;
* `idx`: the standard IDX files; `tfds_source`: `tfds.data_source` (MNIST, and any TFDS
  image-classification dataset by name, `open_tfds`);
* `folder`: image folders in the torchvision ImageFolder layout, decoded with Pillow;
* `records`: a split as a random-access record source (``len``, ``source[i] -> (image,
  label)``), read into memory (`materialize`) or counted in one pass (`channel_stats`);
* `stats_cache`: the per-channel train mean and std, cached in the workdir;
* `download`: the IDX files fetched from mirrors, verified, into the cache (`default_root`);
* `loading`: `DataSpec` (what to read, `config.data`), `load_datasets`, the source choice
  (``auto``, ``tfds``, ``idx``, ``download``, ``folder``) and the validation split;
* `batching`: training batches as a pure function of ``(seed, step)``, padded eval batches;
* `preprocess`: scaling, resizing and normalisation on device;
* `streaming`: splits too large for memory, decoded on demand by worker threads
  (`StreamedSplit`), and training batches read ahead (`train_batches`);
* `augment`: random resized crop and horizontal flip inside the jitted train step.

The names below are the package's API; the submodules are its implementation.
"""

from bcam_jax.data.augment import AugmentOptions, augment_pixels
from bcam_jax.data.batching import eval_batches, steps_per_epoch, train_batch_indices
from bcam_jax.data.dataset import (
  DATA_DIR_ENV,
  DATASETS,
  IMAGE_SIZE,
  IMAGENET_MEAN,
  IMAGENET_STD,
  NORMALIZATIONS,
  PROTOTYPE_KINDS,
  PROTOTYPE_SOURCES,
  DataError,
  DatasetInfo,
  Datasets,
  Split,
  dataset_info,
  imagenet_normalized,
)
from bcam_jax.data.download import (
  MIRROR_ENV,
  dataset_dir,
  default_root,
  download_dataset,
  is_cached,
)
from bcam_jax.data.folder import (
  FolderDataset,
  FolderIndex,
  conform_image,
  decode_image,
  read_image_folder,
  resize_center_crop,
  scan_image_folder,
)
from bcam_jax.data.idx import IDX_FILES, load_idx, read_idx_images, read_idx_labels
from bcam_jax.data.loading import DataSpec, load_datasets, load_tfds_by_name, split_train_val
from bcam_jax.data.preprocess import normalize, preprocess, to_pixels
from bcam_jax.data.records import RecordSource, SplitRecords, channel_stats, materialize
from bcam_jax.data.stats_cache import load_or_compute_stats
from bcam_jax.data.streaming import (
  FolderSource,
  LazyImages,
  StreamedSplit,
  is_streamed,
  load_streamed_folder,
  prefetched,
  train_batches,
)
from bcam_jax.data.tfds_source import TfdsDataset, TfdsRecords, load_tfds, open_tfds

__all__ = [  # noqa: RUF022  (the streaming and augmentation names in a block of their own)
  'AugmentOptions',
  'augment_pixels',
  'FolderSource',
  'LazyImages',
  'StreamedSplit',
  'is_streamed',
  'load_streamed_folder',
  'prefetched',
  'train_batches',
  'DATASETS',
  'DATA_DIR_ENV',
  'IDX_FILES',
  'IMAGE_SIZE',
  'IMAGENET_MEAN',
  'IMAGENET_STD',
  'MIRROR_ENV',
  'NORMALIZATIONS',
  'DataError',
  'DatasetInfo',
  'PROTOTYPE_KINDS',
  'PROTOTYPE_SOURCES',
  'Datasets',
  'FolderDataset',
  'FolderIndex',
  'RecordSource',
  'Split',
  'SplitRecords',
  'TfdsDataset',
  'TfdsRecords',
  'channel_stats',
  'conform_image',
  'dataset_dir',
  'dataset_info',
  'decode_image',
  'default_root',
  'download_dataset',
  'eval_batches',
  'imagenet_normalized',
  'is_cached',
  'DataSpec',
  'load_datasets',
  'load_idx',
  'load_or_compute_stats',
  'load_tfds',
  'load_tfds_by_name',
  'materialize',
  'normalize',
  'open_tfds',
  'preprocess',
  'read_image_folder',
  'read_idx_images',
  'read_idx_labels',
  'resize_center_crop',
  'scan_image_folder',
  'split_train_val',
  'steps_per_epoch',
  'to_pixels',
  'train_batch_indices',
]
