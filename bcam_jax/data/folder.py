"""Image folders in the torchvision ImageFolder layout, decoded with Pillow into memory.

The layout is ``root/<split>/<class>/<image>`` with the splits ``train`` and ``test``
(required) and ``val`` (optional); images are ``.png``, ``.jpg`` or ``.jpeg`` files (any case)
anywhere below a class folder, as torchvision's ``ImageFolder`` finds them. Class names are
the sorted folder names of ``train``; every other split must have the same class folders.
Names starting with '.' are ignored; so are files with other extensions, counted in one log
line.

Channels (`channels`):

* ``None``: 1 when every image of every split has a greyscale mode ('1', 'L', 'LA', or a
  16/32-bit integer mode such as 'I;16'), else 3. Every split counts, so that a colour image
  is never turned grey unless 1 channel is asked for;
* 3: every image becomes RGB: greyscale as three equal channels, RGBA / LA lose their alpha
  (as torchvision's ``convert('RGB')`` loader does), palette and CMYK images are converted;
* 1: every image becomes 'L', colour ones by Pillow's ITU-R 601-2 luma.

16-bit greyscale becomes 8-bit by ``round(v / 257)`` (Pillow's own conversion clips at 255).

Size (`image_size`): ``None`` keeps the images as they are and needs them all to have one
square size; ``S`` resizes the shorter side to S (the longer to ``int(S * long / short)``) with
Pillow's antialiased bilinear filter, then crops the central S x S: torchvision's
``Resize(S)`` + ``CenterCrop(S)`` evaluation transform.

Files are read in a thread pool (Pillow releases the GIL while decoding) in the order
(class, path), so one folder always gives the same arrays whatever the number of workers.
"""

import concurrent.futures
import dataclasses
import functools
import os

import numpy as np
from absl import logging
from PIL import Image

from bcam_jax.data.dataset import DataError, Split
from bcam_jax.data.records import SplitRecords, channel_stats

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
SPLITS = ('train', 'val', 'test')  # In this order in `FolderDataset.splits`.
REQUIRED_SPLITS = ('train', 'test')
OPTIONAL_SPLITS = ('val',)
# Modes with one intensity channel (and possibly alpha); 'I' and 'I;16*' hold 16-bit values.
_GREY_MODES = frozenset({'1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16L', 'I;16B', 'I;16N'})
_WIDE_MODES = frozenset({'I', 'I;16', 'I;16L', 'I;16B', 'I;16N'})


@dataclasses.dataclass(frozen=True)
class FolderIndex:
  """The image files of a folder: class names and, per split, (path, label) in load order."""

  root: str
  class_names: tuple[str, ...]
  files: dict[str, tuple[tuple[str, int], ...]]


@dataclasses.dataclass(frozen=True)
class FolderDataset:
  """An image folder in memory: uint8 (N, S, S, channels) splits and the train statistics.

  `mean` and `std` are per channel, over every pixel of the train split in [0, 1] units
  (population std), for normalising data that has no literature constants.
  """

  root: str
  class_names: tuple[str, ...]
  channels: int
  image_size: int
  splits: dict[str, Split]

  @functools.cached_property
  def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return channel_stats(SplitRecords(self.splits['train']))

  @property
  def mean(self) -> tuple[float, ...]:
    """Per-channel mean of the train split (computed on first use)."""
    return self._stats[0]

  @property
  def std(self) -> tuple[float, ...]:
    """Per-channel population std of the train split (computed on first use)."""
    return self._stats[1]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _visible_sorted(names) -> list[str]:
  return sorted(name for name in names if not name.startswith('.'))


def _class_files(class_dir: str) -> tuple[list[str], int]:
  """The image files below `class_dir` (recursively, sorted by path) and the count of others."""
  images, ignored = [], 0
  for directory, subdirs, names in os.walk(class_dir, followlinks=True):
    subdirs[:] = _visible_sorted(subdirs)  # os.walk does not descend into hidden folders.
    for name in _visible_sorted(names):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        images.append(os.path.join(directory, name))
      else:
        ignored += 1
  return sorted(images), ignored


def scan_image_folder(root: str | os.PathLike) -> FolderIndex:
  """Lists the image files of `root/<split>/<class>/`, validating the layout.

  Raises a DataError naming the folder when `root`, `train` or `test` is missing, when a
  split's class folders differ from train's, or when a class folder holds no image.
  """
  root = os.fspath(root)
  layout = f'{os.path.join(root, "<split>", "<class>", "*")}.{{png,jpg,jpeg}}'
  if not os.path.isdir(root):
    raise DataError(f'Image folder {root} does not exist or is not a directory.')
  present = _visible_sorted(os.listdir(root))
  missing = [s for s in REQUIRED_SPLITS if not os.path.isdir(os.path.join(root, s))]
  if missing:
    raise DataError(
      f'Image folder {root}: no {" or ".join(repr(s) for s in missing)} folder (found: '
      f'{", ".join(present) or "nothing"}). Expected {layout} with the splits '
      f'{" and ".join(REQUIRED_SPLITS)} (required) and {", ".join(OPTIONAL_SPLITS)} (optional).'
    )
  splits = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
  class_names, files, ignored = None, {}, 0
  for split in splits:
    split_dir = os.path.join(root, split)
    entries = _visible_sorted(os.listdir(split_dir))
    classes = tuple(e for e in entries if os.path.isdir(os.path.join(split_dir, e)))
    ignored += len(entries) - len(classes)  # Files directly in the split folder.
    if not classes:
      raise DataError(f'{split_dir}: no class folders; expected {layout}.')
    if class_names is None:
      class_names = classes
    elif classes != class_names:
      lacking = sorted(set(class_names) - set(classes))
      extra = sorted(set(classes) - set(class_names))
      raise DataError(
        f"{split_dir}: class folders differ from train's: missing {lacking}, extra {extra} "
        f'(every split needs the class folders of {os.path.join(root, "train")}).'
      )
    pairs = []
    for label, name in enumerate(classes):
      paths, others = _class_files(os.path.join(split_dir, name))
      if not paths:
        raise DataError(
          f'{os.path.join(split_dir, name)}: empty class folder: no '
          f'{"/".join(IMAGE_EXTENSIONS)} file (found {others} other files).'
        )
      ignored += others
      pairs.extend((path, label) for path in paths)
    files[split] = tuple(pairs)
  if ignored:
    logging.info(
      'Image folder %s: ignored %d files without a %s extension.',
      root,
      ignored,
      '/'.join(IMAGE_EXTENSIONS),
    )
  return FolderIndex(root=root, class_names=class_names, files=files)


def _pillow_error(path: str, e: Exception) -> DataError:
  return DataError(f'{path}: cannot read the image: Pillow says {type(e).__name__}: {e}')


def _header(path: str) -> tuple[str, tuple[int, int]]:
  """The mode and (width, height) of an image, reading only its header."""
  try:
    with Image.open(path) as image:
      return image.mode, image.size
  except Exception as e:  # Any failure of Pillow on this file is reported, naming it.
    raise _pillow_error(path, e) from e


def _convert(image: Image.Image, mode: str) -> Image.Image:
  """`image` in mode 'L' or 'RGB': first to its own kind (grey or colour), then to `mode`.

  16-bit values are scaled to 8 bits rather than clipped; palette images go through RGBA so
  that Pillow applies a transparency entry instead of warning about it.
  """
  if image.mode in _WIDE_MODES:
    wide = np.clip(np.asarray(image, np.float64), 0, 65535)
    image = Image.fromarray(np.rint(wide / 257).astype(np.uint8))
  elif image.mode == 'P':
    image = image.convert('RGBA')
  if image.mode not in ('L', 'RGB'):
    image = image.convert('L' if image.mode in _GREY_MODES else 'RGB')
  return image if image.mode == mode else image.convert(mode)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
  """torchvision's Resize(size) + CenterCrop(size): shorter side to `size`, central square."""
  width, height = image.size
  if width <= height:
    new_size = (size, int(size * height / width))
  else:
    new_size = (int(size * width / height), size)
  image = image.resize(new_size, Image.Resampling.BILINEAR)
  left = int(round((new_size[0] - size) / 2.0))
  top = int(round((new_size[1] - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def conform_image(image: Image.Image, channels: int, image_size: int | None = None) -> np.ndarray:
  """A Pillow image as uint8 (H, W, channels): converted to grey or RGB and, when
  `image_size` is given, resized and centre-cropped (`resize_center_crop`) as the module
  says. Shared with the TFDS source, whose records are converted the same way."""
  image = _convert(image, 'L' if channels == 1 else 'RGB')
  if image_size is not None:
    image = resize_center_crop(image, image_size)
  # A copy of the pixels (np.array), so that nothing refers to the image's buffer.
  return np.array(image, np.uint8).reshape(image.size[1], image.size[0], channels)


def decode_image(path: str, channels: int, image_size: int | None = None) -> np.ndarray:
  """One image file as uint8 (H, W, channels), converted and resized as the module says."""
  try:
    with Image.open(path) as opened:
      opened.load()
      # The pixels are copied before the file is closed.
      return conform_image(opened, channels, image_size)
  except Exception as e:  # Truncated or corrupt data surfaces at load(); name the file.
    raise _pillow_error(path, e) from e


def _check_one_size(headers: list[tuple[str, str, tuple[int, int]]]) -> int:
  """The side of the images when all are one square size, or a DataError naming the culprits."""
  hint = 'set image_size=S to resize the shorter side of every image to S and centre-crop S x S'
  first_path, _, (width, height) = headers[0]
  for path, _, size in headers:
    if size != (width, height):
      raise DataError(
        f'Images differ in size: {first_path} is {width}x{height} but {path} is '
        f'{size[0]}x{size[1]} (width x height); {hint}.'
      )
  if width != height:
    raise DataError(
      f'Images are {width}x{height} (width x height, e.g. {first_path}), not square; {hint}.'
    )
  return width


def read_image_folder(
  root: str | os.PathLike,
  image_size: int | None = None,
  channels: int | None = None,
  workers: int | None = None,
) -> FolderDataset:
  """Reads a whole image folder into memory (see the module docstring for the rules).

  `workers` is the number of decoding threads (default: one per CPU, at most 16); it does not
  change the result. Raises a DataError naming the folder, the file or the value at fault.
  """
  if channels not in (None, 1, 3):
    raise DataError(f'channels must be None (from the images), 1 or 3; got {channels!r}.')
  if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
    raise DataError(f'image_size must be None or a positive integer; got {image_size!r}.')
  if workers is None:
    workers = min(16, os.cpu_count() or 1)
  elif workers < 1:
    raise DataError(f'workers must be a positive integer; got {workers!r}.')
  index = scan_image_folder(root)
  root = index.root
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    all_files = [pair for pairs in index.files.values() for pair in pairs]
    headers = [
      (path, mode, size)
      for (path, _), (mode, size) in zip(all_files, pool.map(_header, [p for p, _ in all_files]))
    ]
    if channels is None:
      channels = 1 if all(mode in _GREY_MODES for _, mode, _ in headers) else 3
    size = _check_one_size(headers) if image_size is None else image_size
    splits = {}
    for split, pairs in index.files.items():
      images = np.empty((len(pairs), size, size, channels), np.uint8)
      paths = [path for path, _ in pairs]
      decoded = pool.map(decode_image, paths, [channels] * len(paths), [image_size] * len(paths))
      for i, image in enumerate(decoded):
        images[i] = image
      labels = np.array([label for _, label in pairs], np.int32)
      splits[split] = Split(images, labels)
  return folder_dataset(index, channels, size, splits)


def folder_dataset(
  index: FolderIndex, channels: int, size: int, splits: dict, how: str = 'in memory'
) -> FolderDataset:
  """The `FolderDataset` of `splits` (in memory or streamed, `how`, for the log); its mean
  and std are computed on first use, in one chunked pass over the train split."""
  logging.info(
    'Image folder %s (%s): %d classes, %d channels, %dx%d, %s.',
    index.root,
    how,
    len(index.class_names),
    channels,
    size,
    size,
    ', '.join(f'{split} {len(s)}' for split, s in splits.items()),
  )
  return FolderDataset(
    root=index.root,
    class_names=index.class_names,
    channels=channels,
    image_size=size,
    splits=splits,
  )
