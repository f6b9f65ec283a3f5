"""Report figures: valid PNGs written atomically, shape checks, and data that shows."""

import os

import numpy as np
import pytest
from PIL import Image

from bcam_jax.report import figures

C, H, W = 3, 8, 8
NAMES = ['zero', 'one', 'two']


def _rng(seed: int = 0) -> np.random.Generator:
  return np.random.default_rng(seed)


def _read_png(path) -> np.ndarray:
  """Asserts `path` is the only file in its directory and a valid PNG; returns its pixels."""
  assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temp files left
  with Image.open(path) as image:
    assert image.format == 'PNG'
    assert image.width > 0 and image.height > 0
    assert image.mode in ('RGB', 'RGBA')
    return np.asarray(image)


def _confusion_png(tmp_path, confusion, name: str) -> np.ndarray:
  path = tmp_path / name
  path.mkdir()
  figures.save_confusion(str(path / 'confusion.png'), confusion, NAMES)
  return _read_png(str(path / 'confusion.png'))


def test_confusion_writes_png_that_depends_on_data(tmp_path):
  a = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 4]])
  b = np.array([[5, 0, 1], [1, 7, 2], [0, 0, 4]])  # same accuracy, other off-diagonals
  pixels_a = _confusion_png(tmp_path, a, 'a')
  pixels_b = _confusion_png(tmp_path, b, 'b')
  assert pixels_a.shape == pixels_b.shape
  assert not np.array_equal(pixels_a, pixels_b)


def test_confusion_shape_mismatch(tmp_path):
  with pytest.raises(ValueError, match=r'confusion: expected shape \(3, 3\), got \(3, 4\)'):
    figures.save_confusion(str(tmp_path / 'c.png'), np.ones((3, 4)), NAMES)
  assert os.listdir(tmp_path) == []


def _cam_prototypes_png(tmp_path, mean_cams, counts, name: str) -> np.ndarray:
  path = tmp_path / name
  path.mkdir()
  prototypes = _rng(1).random((C, H, W))
  figures.save_cam_prototypes(
    str(path / 'cams.png'), prototypes, mean_cams, counts, NAMES, 'Batch-CAM'
  )
  return _read_png(str(path / 'cams.png'))


def test_cam_prototypes_writes_png_that_depends_on_data(tmp_path):
  counts = np.array([4, 2, 3])
  pixels_a = _cam_prototypes_png(tmp_path, _rng(2).random((C, H, W)), counts, 'a')
  pixels_b = _cam_prototypes_png(tmp_path, _rng(3).random((C, H, W)), counts, 'b')
  assert pixels_a.shape == pixels_b.shape
  assert not np.array_equal(pixels_a, pixels_b)


def test_cam_prototypes_blank_panel_for_empty_class(tmp_path):
  counts = np.array([4, 0, 3])
  cams_a = _rng(2).random((C, H, W))
  cams_b = cams_a.copy()
  cams_b[1] = 1 - cams_b[1]  # only the class with no images differs
  pixels_a = _cam_prototypes_png(tmp_path, cams_a, counts, 'a')
  pixels_b = _cam_prototypes_png(tmp_path, cams_b, counts, 'b')
  np.testing.assert_array_equal(pixels_a, pixels_b)


def test_cam_prototypes_shape_mismatch(tmp_path):
  prototypes = np.zeros((C, H, W))
  with pytest.raises(ValueError, match=r'mean_cams: expected shape \(3, 8, 8\), got \(3, 8, 7\)'):
    figures.save_cam_prototypes(
      str(tmp_path / 'p.png'), prototypes, np.zeros((C, H, 7)), np.ones(C), NAMES, 't'
    )
  with pytest.raises(ValueError, match=r'counts: expected shape \(3,\)'):
    figures.save_cam_prototypes(
      str(tmp_path / 'p.png'), prototypes, prototypes, np.ones(C + 1), NAMES, 't'
    )


def test_error_prototypes(tmp_path):
  names = [str(c) for c in range(10)]
  pairs = [(4, 9, 12), (3, 5, 7)]
  path = str(tmp_path / 'errors.png')
  figures.save_error_prototypes(
    path, pairs, _rng(4).random((2, H, W)), _rng(5).random((10, H, W)), names, 'errors'
  )
  _read_png(path)


def test_error_prototypes_without_pairs(tmp_path):
  path = str(tmp_path / 'errors.png')
  figures.save_error_prototypes(path, [], np.zeros((0, H, W)), np.zeros((C, H, W)), NAMES, 'errors')
  _read_png(path)


def test_error_prototypes_shape_mismatch(tmp_path):
  with pytest.raises(ValueError, match=r'mean_cams: expected shape \(1, 8, 8\), got \(2, 8, 8\)'):
    figures.save_error_prototypes(
      str(tmp_path / 'e.png'), [(0, 1, 3)], np.zeros((2, H, W)), np.zeros((C, H, W)), NAMES, 't'
    )
  with pytest.raises(ValueError, match='pairs: class indices'):
    figures.save_error_prototypes(
      str(tmp_path / 'e.png'), [(0, 3, 3)], np.zeros((1, H, W)), np.zeros((C, H, W)), NAMES, 't'
    )


def test_overlays(tmp_path):
  n = 2
  rng = _rng(6)
  maps = {'grad_cam': rng.random((n, H, W)), 'batch_cam': rng.random((n, H, W))}
  path = str(tmp_path / 'overlays.png')
  figures.save_overlays(path, rng.random((n, H, W)), maps, [0, 2], [0, 1], NAMES)
  _read_png(path)
  for channels in (1, 3):  # grey with a channel axis, and RGB
    figures.save_overlays(path, rng.random((n, H, W, channels)), maps, [0, 2], [0, 1], NAMES)
    _read_png(path)


def test_overlays_shape_mismatch(tmp_path):
  images = np.zeros((2, H, W))
  with pytest.raises(ValueError, match=r"maps\['grad_cam'\]: expected shape \(2, 8, 8\)"):
    figures.save_overlays(
      str(tmp_path / 'o.png'), images, {'grad_cam': np.zeros((3, H, W))}, [0, 1], [0, 1], NAMES
    )
  with pytest.raises(ValueError, match=r'predictions: expected shape \(2,\), got \(1,\)'):
    figures.save_overlays(str(tmp_path / 'o.png'), images, {}, [0, 1], [0], NAMES)
  with pytest.raises(ValueError, match=r'images: expected shape .*3\), got \(2, 8, 8, 2\)'):
    figures.save_overlays(
      str(tmp_path / 'o.png'), np.zeros((2, H, W, 2)), {}, [0, 1], [0, 1], NAMES
    )


def test_cams_next_to_prototypes_is_a_labelled_colour_image():
  """TensorBoard's CAM-vs-prototype image: the figure of save_cam_prototypes (class names,
  row labels, a jet colorbar) as RGB in [0, 1], not bare grey tiles."""
  rng = _rng(7)
  image = figures.cams_next_to_prototypes(
    rng.random((C, H, W)), rng.random((C, H, W)), NAMES, 'step 5'
  )
  assert image.ndim == 3 and image.shape[2] == 3
  assert image.shape[0] > 2 * H and image.shape[1] > C * W
  assert 0 <= image.min() and image.max() <= 1
  assert np.abs(image[..., 0] - image[..., 2]).max() > 0.5  # the colorbar's colours


def test_image_grid_title_adds_a_line_above(tmp_path):
  images = _rng(8).random((C, H, W))
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b').mkdir()
  figures.save_image_grid(str(tmp_path / 'a' / 'g.png'), images, NAMES)
  figures.save_image_grid(str(tmp_path / 'b' / 'g.png'), images, NAMES, 'class prototypes')
  plain = _read_png(str(tmp_path / 'a' / 'g.png'))
  titled = _read_png(str(tmp_path / 'b' / 'g.png'))
  assert titled.shape[0] > plain.shape[0]


def test_long_titles_wrap_to_the_figure_width():
  """A title wider than its figure (the prototype figure of a 3-class folder) is wrapped,
  word for word, instead of being cut off at both sides."""
  from matplotlib.figure import Figure

  title = (
    'bcpl-l1 on shapes: data prototypes and mean Grad-CAM of correctly classified test '
    'images (train prototypes)'
  )
  fig = Figure(figsize=(6.2, 3.7))
  figures._suptitle(fig, title)
  lines = fig._suptitle.get_text().split('\n')
  assert len(lines) == 2 and all(len(line) <= 62 for line in lines)
  assert ' '.join(lines) == title
  wide = Figure(figsize=(30, 3))
  figures._suptitle(wide, title)
  assert wide._suptitle.get_text() == title


def test_long_method_names_break_after_their_underscores():
  """Overlay column titles: a long name on lines of at most 16 characters, never inside a
  word, so deep_feature_factorization does not run into its neighbours' titles."""
  assert figures._column_title('grad_cam') == 'grad_cam'
  assert figures._column_title('guided_backprop') == 'guided_backprop'  # 15: one line
  assert figures._column_title('deep_feature_factorization') == 'deep_feature_\nfactorization'
  assert figures._column_title('grad_cam_elementwise') == 'grad_cam_\nelementwise'
