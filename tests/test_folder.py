"""Tests of bcam_jax.data.folder on tiny image folders written by the tests themselves."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from bcam_jax import data

CLASSES = ('cat', 'dog', 'emu')


def rgb(seed, size=(8, 8)):
  """A random RGB uint8 array of (height, width) `size`."""
  return np.random.default_rng(seed).integers(0, 256, (*size, 3), np.uint8)


def grey(seed, size=(8, 8)):
  return np.random.default_rng(seed).integers(0, 256, size, np.uint8)


def save(root, split, cls, name, array, **kwargs):
  """Writes `array` (or a PIL image) as root/split/cls/name; returns the path."""
  path = os.path.join(root, split, cls, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = array if isinstance(array, Image.Image) else Image.fromarray(array)
  image.save(path, **kwargs)
  return path


def make_folder(root, splits=('train', 'val', 'test'), per_class=2, colour=True, size=(8, 8)):
  """Writes PNG images (RGB, or greyscale when not `colour`); returns {split: [arrays]}."""
  written = {}
  seed = 0
  for split in splits:
    written[split] = []
    for cls in CLASSES:
      for k in range(per_class):
        seed += 1
        array = rgb(seed, size) if colour else grey(seed, size)
        save(root, split, cls, f'{k}.png', array)
        written[split].append(array)
  return written


def message(excinfo):
  return str(excinfo.value)


def test_rgb_round_trip_labels_and_class_names(tmp_path):
  written = make_folder(tmp_path)
  folder = data.read_image_folder(str(tmp_path))
  assert folder.class_names == CLASSES and folder.num_classes == 3
  assert folder.channels == 3 and folder.image_size == 8
  assert list(folder.splits) == ['train', 'val', 'test']
  for split, arrays in written.items():
    got = folder.splits[split]
    assert got.images.dtype == np.uint8 and got.images.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(got.images, np.stack(arrays))
    np.testing.assert_array_equal(got.labels, np.array([0, 0, 1, 1, 2, 2], np.int32))
    assert got.labels.dtype == np.int32


def test_val_is_optional(tmp_path):
  make_folder(tmp_path, splits=('train', 'test'))
  assert list(data.read_image_folder(str(tmp_path)).splits) == ['train', 'test']


def test_mixed_png_jpeg_rgb_and_greyscale(tmp_path):
  make_folder(tmp_path, colour=True)
  g = grey(100)
  save(tmp_path, 'train', 'cat', 'grey.png', g)
  colour = np.broadcast_to(np.array([200, 40, 90], np.uint8), (8, 8, 3))
  photo_path = save(tmp_path, 'train', 'dog', 'photo.JPG', np.ascontiguousarray(colour))
  save(tmp_path, 'train', 'dog', 'grey.jpeg', np.full((8, 8), 90, np.uint8), quality=95)
  folder = data.read_image_folder(str(tmp_path))
  train = folder.splits['train']
  assert folder.channels == 3 and train.images.shape == (9, 8, 8, 3)
  # Order is (class, path): cat/0, cat/1, cat/grey, dog/0, dog/1, dog/grey, dog/photo, ...
  np.testing.assert_array_equal(train.labels, [0, 0, 0, 1, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(train.images[2], np.repeat(g[..., None], 3, -1))
  flat_jpeg = train.images[5].astype(int)
  assert np.abs(flat_jpeg - 90).max() <= 2  # Lossy, but a flat grey stays near flat grey.
  assert np.abs(train.images[6].astype(int) - colour).max() <= 4
  with Image.open(photo_path) as photo:  # The decode is Pillow's, bit for bit.
    np.testing.assert_array_equal(train.images[6], np.asarray(photo.convert('RGB')))


def test_all_greyscale_gives_one_channel(tmp_path):
  written = make_folder(tmp_path, colour=False)
  save(tmp_path, 'test', 'emu', 'alpha.png', Image.fromarray(grey(7)).convert('LA'))
  folder = data.read_image_folder(str(tmp_path))
  assert folder.channels == 1
  assert folder.splits['train'].images.shape == (6, 8, 8, 1)
  np.testing.assert_array_equal(folder.splits['val'].images[..., 0], np.stack(written['val']))
  np.testing.assert_array_equal(folder.splits['test'].images[6, ..., 0], grey(7))


def test_one_colour_image_in_any_split_makes_the_dataset_rgb(tmp_path):
  make_folder(tmp_path, colour=False)
  save(tmp_path, 'test', 'emu', 'colour.png', rgb(5))
  folder = data.read_image_folder(str(tmp_path))
  assert folder.channels == 3
  np.testing.assert_array_equal(folder.splits['test'].images[-1], rgb(5))


def test_explicit_channels(tmp_path):
  make_folder(tmp_path / 'colour', colour=True)
  one = data.read_image_folder(str(tmp_path / 'colour'), channels=1)
  assert one.channels == 1 and one.splits['train'].images.shape == (6, 8, 8, 1)
  expected = np.asarray(Image.fromarray(rgb(1)).convert('L'))  # ITU-R 601-2 luma.
  np.testing.assert_array_equal(one.splits['train'].images[0, ..., 0], expected)
  make_folder(tmp_path / 'grey', colour=False)
  three = data.read_image_folder(str(tmp_path / 'grey'), channels=3)
  assert three.channels == 3
  np.testing.assert_array_equal(
    three.splits['train'].images[0], np.repeat(grey(1)[..., None], 3, -1)
  )


def test_rgba_palette_and_16_bit_pngs(tmp_path):
  make_folder(tmp_path, colour=True)
  rgba = np.concatenate([rgb(20), np.full((8, 8, 1), 7, np.uint8)], -1)
  save(tmp_path, 'train', 'cat', 'rgba.png', rgba)
  palette = Image.fromarray(rgb(21)).quantize(colors=16)
  palette.info['transparency'] = 0
  save(tmp_path, 'train', 'cat', 'palette.png', palette, transparency=0)
  wide = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
  save(tmp_path, 'train', 'cat', 'wide.png', Image.fromarray(wide))
  folder = data.read_image_folder(str(tmp_path))
  images = folder.splits['train'].images  # cat/0, cat/1, palette, rgba, wide, dog/...
  np.testing.assert_array_equal(images[2], np.asarray(palette.convert('RGB')))
  np.testing.assert_array_equal(images[3], rgba[..., :3])  # Alpha dropped, not composited.
  wide_8 = np.rint(wide / 257).astype(np.uint8)  # Scaled, not clipped at 255.
  np.testing.assert_array_equal(images[4], np.repeat(wide_8[..., None], 3, -1))


def test_16_bit_greyscale_alone_gives_one_channel(tmp_path):
  make_folder(tmp_path, colour=False)
  wide = np.full((8, 8), 65535, np.uint16)
  save(tmp_path, 'train', 'emu', 'wide.png', Image.fromarray(wide))
  folder = data.read_image_folder(str(tmp_path))
  assert folder.channels == 1
  np.testing.assert_array_equal(folder.splits['train'].images[-1], 255)


def test_hidden_and_other_files_are_ignored_and_logged(tmp_path, caplog):
  written = make_folder(tmp_path)
  save(tmp_path, 'train', 'cat', '.hidden.png', rgb(50))
  save(tmp_path, 'train', '.cache', 'x.png', rgb(51))
  for name in ('notes.txt', 'cat/readme.md', 'dog/image.bmp'):
    (tmp_path / 'train' / name).write_text('x')
  with caplog.at_level(logging.INFO):
    folder = data.read_image_folder(str(tmp_path))
  assert folder.class_names == CLASSES
  np.testing.assert_array_equal(folder.splits['train'].images, np.stack(written['train']))
  assert 'ignored 3 files without a .png/.jpg/.jpeg extension' in caplog.text


def test_nested_files_in_a_class_folder_are_found(tmp_path):
  make_folder(tmp_path)
  save(tmp_path, 'train', 'dog', 'sub/deep.png', rgb(60))
  save(tmp_path, 'train', 'dog', 'z.png', rgb(61))
  train = data.read_image_folder(tmp_path).splits['train']  # A path object works too.
  # Sorted by path within the class: dog/0, dog/1, dog/sub/deep, dog/z.
  np.testing.assert_array_equal(train.images[4], rgb(60))
  np.testing.assert_array_equal(train.images[5], rgb(61))
  np.testing.assert_array_equal(train.labels[2:7], [1, 1, 1, 1, 2])


def test_corrupt_image_is_named(tmp_path):
  make_folder(tmp_path)
  bad = tmp_path / 'train' / 'dog' / 'bad.png'
  bad.write_bytes(b'not an image at all')
  with pytest.raises(data.DataError) as excinfo:
    data.read_image_folder(str(tmp_path))
  assert str(bad) in message(excinfo) and 'cannot identify image file' in message(excinfo)


def test_truncated_image_is_named(tmp_path):
  make_folder(tmp_path, size=(12, 12))
  path = tmp_path / 'test' / 'emu' / '1.png'
  path.write_bytes(path.read_bytes()[:60])
  with pytest.raises(data.DataError) as excinfo:
    data.read_image_folder(str(tmp_path))
  assert message(excinfo).startswith(f'{path}: cannot read the image: Pillow says ')


def test_empty_class_folder_is_named(tmp_path):
  make_folder(tmp_path)
  empty = tmp_path / 'val' / 'emu'
  for name in os.listdir(empty):
    os.remove(empty / name)
  (empty / 'notes.txt').write_text('x')
  with pytest.raises(data.DataError, match='empty class folder') as excinfo:
    data.read_image_folder(str(tmp_path))
  assert message(excinfo).startswith(f'{empty}: empty class folder')


def test_mismatched_class_sets_name_missing_and_extra(tmp_path):
  make_folder(tmp_path)
  os.rename(tmp_path / 'test' / 'dog', tmp_path / 'test' / 'wolf')
  with pytest.raises(data.DataError) as excinfo:
    data.read_image_folder(str(tmp_path))
  text = message(excinfo)
  assert text.startswith(f'{tmp_path / "test"}: class folders differ from train')
  assert "missing ['dog'], extra ['wolf']" in text


@pytest.mark.parametrize('split', ['train', 'test'])
def test_missing_required_split(tmp_path, split):
  make_folder(tmp_path, splits=tuple(s for s in ('train', 'val', 'test') if s != split))
  with pytest.raises(data.DataError) as excinfo:
    data.read_image_folder(str(tmp_path))
  assert f"no '{split}' folder" in message(excinfo)
  assert 'train and test (required) and val (optional)' in message(excinfo)


def test_missing_root(tmp_path):
  with pytest.raises(data.DataError, match='does not exist'):
    data.read_image_folder(str(tmp_path / 'nowhere'))


def test_mixed_sizes_need_image_size(tmp_path):
  make_folder(tmp_path)
  odd = save(tmp_path, 'train', 'dog', 'wide.png', rgb(70, (6, 10)))
  with pytest.raises(data.DataError) as excinfo:
    data.read_image_folder(str(tmp_path))
  first = str(tmp_path / 'train' / 'cat' / '0.png')
  assert f'{first} is 8x8 but {odd} is 10x6 (width x height)' in message(excinfo)
  assert 'set image_size=S' in message(excinfo)


def test_non_square_images_need_image_size(tmp_path):
  make_folder(tmp_path, size=(6, 10))
  with pytest.raises(data.DataError, match='not square; set image_size=S'):
    data.read_image_folder(str(tmp_path))


def test_image_size_resizes_shorter_side_then_centre_crops(tmp_path):
  make_folder(tmp_path, size=(12, 12))
  tall = rgb(80, (11, 7))  # Height 11, width 7.
  save(tmp_path, 'train', 'emu', 'tall.png', tall)
  folder = data.read_image_folder(str(tmp_path), image_size=6)
  assert folder.image_size == 6 and folder.splits['test'].images.shape == (6, 6, 6, 3)
  # By hand: width 7 -> 6, height int(6 * 11 / 7) = 9; crop top round(1.5) = 2 (banker's).
  resized = Image.fromarray(tall).resize((6, 9), Image.Resampling.BILINEAR)
  expected = np.asarray(resized)[2:8, 0:6]
  np.testing.assert_array_equal(folder.splits['train'].images[-1], expected)
  square = Image.fromarray(rgb(5, (12, 12))).resize((6, 6), Image.Resampling.BILINEAR)
  np.testing.assert_array_equal(folder.splits['train'].images[4], np.asarray(square))


def test_deterministic_whatever_the_workers(tmp_path):
  make_folder(tmp_path, per_class=4)
  save(tmp_path, 'train', 'cat', 'j.jpg', rgb(90))
  reads = [data.read_image_folder(str(tmp_path), workers=w) for w in (1, 1, 4)]
  for other in reads[1:]:
    for split in reads[0].splits:
      np.testing.assert_array_equal(other.splits[split].images, reads[0].splits[split].images)
      np.testing.assert_array_equal(other.splits[split].labels, reads[0].splits[split].labels)
    assert (other.mean, other.std) == (reads[0].mean, reads[0].std)


@pytest.mark.parametrize('colour', [True, False])
def test_mean_and_std_per_channel_over_train(tmp_path, colour):
  written = make_folder(tmp_path, colour=colour)
  folder = data.read_image_folder(str(tmp_path))
  pixels = np.stack(written['train']).astype(np.float64) / 255
  pixels = pixels.reshape(-1, 3 if colour else 1)
  np.testing.assert_allclose(folder.mean, pixels.mean(0), rtol=1e-12)
  np.testing.assert_allclose(folder.std, pixels.std(0), rtol=1e-12)
  assert len(folder.mean) == len(folder.std) == folder.channels


@pytest.mark.parametrize(
  'kwargs, text',
  [
    (dict(channels=2), 'channels must be None (from the images), 1 or 3; got 2.'),
    (dict(image_size=0), 'image_size must be None or a positive integer; got 0.'),
    (dict(workers=0), 'workers must be a positive integer; got 0.'),
  ],
)
def test_bad_arguments(tmp_path, kwargs, text):
  make_folder(tmp_path)
  with pytest.raises(data.DataError) as excinfo:
    data.read_image_folder(str(tmp_path), **kwargs)
  assert message(excinfo) == text
