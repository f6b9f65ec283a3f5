"""Matplotlib figures of the evaluation report: confusion matrix, CAM prototypes, overlays.

Figures use the object API (``matplotlib.figure.Figure``), so nothing touches pyplot's
global state or needs a display, and every PNG is written atomically so that a killed run
never leaves a truncated image. Inputs are numpy arrays (anything ``np.asarray`` takes);
shape mismatches raise ValueError naming the argument and the expected vs given shape.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from bcam_jax import io_utils

PANEL_INCHES = 1.6
DPI = 100
# Points at the saved 100 dpi: 9 pt is about 12 px, the smallest text a reader of the PNG
# reads without zooming. Every panel title and label uses it.
LABEL_FONTSIZE = 9


def _check_shape(name: str, array: np.ndarray, expected: tuple[int | None, ...]) -> None:
  """Raises ValueError unless `array` has `expected` shape (None matches any size)."""
  if array.ndim != len(expected) or any(
    e is not None and e != s for e, s in zip(expected, array.shape)
  ):
    shown = tuple('*' if e is None else e for e in expected)
    raise ValueError(f'{name}: expected shape {shown}, got {array.shape}.')


def _check_classes(name: str, indices: np.ndarray, num_classes: int) -> None:
  """Raises ValueError unless every entry of `indices` is a class index in [0, num_classes)."""
  if indices.size and (indices.min() < 0 or indices.max() >= num_classes):
    raise ValueError(
      f'{name}: class indices must lie in [0, {num_classes}), '
      f'got range [{indices.min()}, {indices.max()}].'
    )


def _suptitle(fig: Figure, title: str) -> None:
  """The figure's title, wrapped to the figure's width (about 10 characters an inch at the
  default title size) so that a long title on a narrow figure (few classes) is not cut off."""
  width = max(20, int(fig.get_figwidth() * 10))
  fig.suptitle('\n'.join(textwrap.wrap(title, width)))


def _no_ticks(ax: Axes) -> None:
  """Removes the ticks but keeps the frame, so y labels (row labels) still show."""
  ax.set_xticks([])
  ax.set_yticks([])


def _cam_colorbar(fig: Figure, axes: np.ndarray) -> None:
  """One colorbar beside the CAM panels `axes` (a row or a block of rows, all drawn with
  the jet colormap on [0, 1]), so a reader knows what a colour means; opaque even where
  the panels blend the map over an image."""
  rows = np.atleast_2d(axes).shape[0]
  mappable = ScalarMappable(Normalize(0, 1), cmap='jet')
  bar = fig.colorbar(mappable, ax=axes, shrink=min(0.9, 2.5 / rows), aspect=12, pad=0.01)
  bar.set_label('CAM (0-1)', fontsize=LABEL_FONTSIZE)
  bar.ax.tick_params(labelsize=LABEL_FONTSIZE - 1)


def _save(path: str, fig: Figure) -> None:
  """Writes `fig` to `path` as a PNG, atomically."""
  io_utils.atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=DPI))


def save_confusion(path: str, confusion, class_names: Sequence[str]) -> None:
  """Writes the confusion matrix (rows true, columns predicted) with counts and accuracy.

  Colours are row-normalised so that classes of different sizes compare; zero cells are
  left unannotated to keep large matrices readable.
  """
  confusion = np.asarray(confusion)
  num_classes = len(class_names)
  _check_shape('confusion', confusion, (num_classes, num_classes))
  total = confusion.sum()
  if total <= 0:
    raise ValueError(f'confusion: expected a positive total count, got {total}.')
  rows = confusion.sum(axis=1, keepdims=True)
  normalised = confusion / np.maximum(rows, 1)
  side = max(4.0, 0.5 * num_classes + 2.0)
  fig = Figure(figsize=(side, side), layout='constrained')
  ax = fig.subplots()
  ax.imshow(normalised, cmap='Blues', vmin=0, vmax=1)
  fontsize = 8 if num_classes <= 10 else 6
  for (t, p), count in np.ndenumerate(confusion):
    if count:
      ax.text(
        p,
        t,
        f'{count:g}',
        ha='center',
        va='center',
        fontsize=fontsize,
        color='white' if normalised[t, p] > 0.5 else 'black',
      )
  ax.set_xticks(range(num_classes), [str(n) for n in class_names], rotation=45, ha='right')
  ax.set_yticks(range(num_classes), [str(n) for n in class_names])
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(f'accuracy {100 * np.trace(confusion) / total:.2f}%')
  _save(path, fig)


def save_cam_prototypes(
  path: str, prototypes, mean_cams, counts, class_names: Sequence[str], title: str
) -> None:
  """Writes each class's data prototype above its mean CAM ("reconstructed prototypes").

  Reproduces Figs 2-5 of the Batch-CAM paper. A class with no averaged images gets a blank
  CAM panel titled "n=0", since its mean CAM is undefined.
  """
  _save(path, _cam_prototypes_figure(prototypes, mean_cams, counts, class_names, title))


def cams_next_to_prototypes(
  class_cams, prototypes, class_names: Sequence[str], title: str
) -> np.ndarray:
  """The figure of `save_cam_prototypes` (class names, row labels, colorbar; no counts) as
  an RGB (H, W, 3) image in [0, 1], for TensorBoard."""
  fig = _cam_prototypes_figure(prototypes, class_cams, None, class_names, title)
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3] / 255.0


def _cam_prototypes_figure(
  prototypes, mean_cams, counts, class_names: Sequence[str], title: str
) -> Figure:
  """Prototypes on top, mean CAMs below (titled n=count unless `counts` is None)."""
  prototypes = np.asarray(prototypes)
  mean_cams = np.asarray(mean_cams)
  num_classes = len(class_names)
  _check_shape('prototypes', prototypes, (num_classes, None, None))
  _check_shape('mean_cams', mean_cams, prototypes.shape)
  if counts is not None:
    counts = np.asarray(counts)
    _check_shape('counts', counts, (num_classes,))
  fig = Figure(
    figsize=(PANEL_INCHES * num_classes + 1.4, 2 * PANEL_INCHES + 0.5),
    dpi=DPI,
    layout='constrained',
  )
  axes = fig.subplots(2, num_classes, squeeze=False)
  for c in range(num_classes):
    top, bottom = axes[0, c], axes[1, c]
    top.imshow(prototypes[c], cmap='gray', vmin=0, vmax=1)
    top.set_title(str(class_names[c]), fontsize=LABEL_FONTSIZE)
    if counts is None or counts[c] > 0:
      bottom.imshow(mean_cams[c], cmap='jet', vmin=0, vmax=1)
    if counts is not None:
      bottom.set_title(f'n={counts[c]:g}', fontsize=LABEL_FONTSIZE)
    _no_ticks(top)
    _no_ticks(bottom)
  axes[0, 0].set_ylabel('prototype')
  axes[1, 0].set_ylabel('mean CAM')
  _cam_colorbar(fig, axes[1, :])
  _suptitle(fig, title)
  return fig


def save_error_prototypes(
  path: str, pairs, mean_cams, prototypes, class_names: Sequence[str], title: str
) -> None:
  """Writes, per frequent confusion, the true and predicted prototypes and the mean CAM.

  Paper Fig 6: shows what the model attends to when it mistakes one class for another. The
  paper's caption ("average prototypes for misclassified images") does not say how the
  errors are grouped; one mean CAM per true class is the other reading. Grouping by
  (true, predicted) pair, the most frequent first, keeps the two classes of a confusion
  together, which a per-true-class mean over all its wrong predictions would mix.
  `pairs` holds (true, predicted, count) triples in display order; with no pairs the
  figure says so instead of being left out, so the report always has the file.
  """
  pairs = [tuple(int(v) for v in pair) for pair in pairs]
  mean_cams = np.asarray(mean_cams)
  prototypes = np.asarray(prototypes)
  num_classes = len(class_names)
  _check_shape('prototypes', prototypes, (num_classes, None, None))
  if not pairs:
    if mean_cams.size:
      raise ValueError(f'mean_cams: expected no maps for no pairs, got shape {mean_cams.shape}.')
    fig = Figure(figsize=(4, 1.5), layout='constrained')
    ax = fig.subplots()
    ax.axis('off')
    ax.text(0.5, 0.5, 'no misclassified test images', ha='center', va='center')
    _suptitle(fig, title)
    _save(path, fig)
    return
  if any(len(pair) != 3 for pair in pairs):
    raise ValueError('pairs: expected (true, predicted, count) triples.')
  _check_classes('pairs', np.array([pair[:2] for pair in pairs]), num_classes)
  _check_shape('mean_cams', mean_cams, (len(pairs),) + prototypes.shape[1:])
  fig = Figure(
    figsize=(PANEL_INCHES * len(pairs) + 1.4, 3 * PANEL_INCHES + 1.0), layout='constrained'
  )
  axes = fig.subplots(3, len(pairs), squeeze=False)
  for i, (true, pred, count) in enumerate(pairs):
    axes[0, i].imshow(prototypes[true], cmap='gray', vmin=0, vmax=1)
    axes[1, i].imshow(prototypes[pred], cmap='gray', vmin=0, vmax=1)
    axes[2, i].imshow(mean_cams[i], cmap='jet', vmin=0, vmax=1)
    axes[0, i].set_title(f'true {class_names[true]}', fontsize=LABEL_FONTSIZE)
    axes[1, i].set_title(f'predicted {class_names[pred]}', fontsize=LABEL_FONTSIZE)
    axes[2, i].set_title(f'{count} images', fontsize=LABEL_FONTSIZE)
    for ax in axes[:, i]:
      _no_ticks(ax)
  axes[0, 0].set_ylabel('true prototype')
  axes[1, 0].set_ylabel('predicted prototype')
  axes[2, 0].set_ylabel('mean CAM')
  _cam_colorbar(fig, axes[2, :])
  _suptitle(fig, title)
  _save(path, fig)


def save_overlays(
  path: str,
  images,
  maps: Mapping[str, Any],
  labels,
  predictions,
  class_names: Sequence[str],
  title: str = '',
) -> None:
  """Writes each image next to every method's saliency map overlaid on it.

  One row per image, one column per method, so methods compare side by side on the same
  examples; the first column names the true and predicted class, in red when they differ.
  `images` are [0, 1] grey `(N, H, W)` or `(N, H, W, 1)`, or RGB `(N, H, W, 3)`; maps
  `(N, H, W)` in [0, 1]. `title` (optional) says which images these are, e.g. the first or
  the misclassified ones.
  """
  images = np.asarray(images)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  maps = {name: np.asarray(m) for name, m in maps.items()}
  labels = np.asarray(labels)
  predictions = np.asarray(predictions)
  if images.ndim == 4:
    _check_shape('images', images, (None, None, None, 3))
  else:
    _check_shape('images', images, (None, None, None))
  n = len(images)
  if n == 0:
    raise ValueError('images: expected at least one image, got shape (0, ...).')
  for name, m in maps.items():
    _check_shape(f'maps[{name!r}]', m, images.shape[:3])
  _check_shape('labels', labels, (n,))
  _check_shape('predictions', predictions, (n,))
  _check_classes('labels', labels, len(class_names))
  _check_classes('predictions', predictions, len(class_names))
  cols = 1 + len(maps)
  fig = Figure(figsize=(PANEL_INCHES * cols + 1.0, PANEL_INCHES * n + 0.6), layout='constrained')
  axes = fig.subplots(n, cols, squeeze=False)
  for i in range(n):
    axes[i, 0].imshow(images[i], cmap='gray', vmin=0, vmax=1)
    wrong = labels[i] != predictions[i]
    axes[i, 0].set_title(
      f'true {class_names[labels[i]]}\npred {class_names[predictions[i]]}',
      fontsize=LABEL_FONTSIZE,
      color='tab:red' if wrong else 'black',
    )
    for j, (name, m) in enumerate(maps.items(), start=1):
      axes[i, j].imshow(images[i], cmap='gray', vmin=0, vmax=1)
      axes[i, j].imshow(m[i], cmap='jet', alpha=0.5, vmin=0, vmax=1)
      if i == 0:
        axes[i, j].set_title(_column_title(name), fontsize=LABEL_FONTSIZE + 1)
    for ax in axes[i]:
      _no_ticks(ax)
  if maps:
    _cam_colorbar(fig, axes[:, 1:])
  if title:
    _suptitle(fig, title)
  _save(path, fig)


def _column_title(name: str, width: int = 16) -> str:
  """A method's name on lines of at most `width` characters, broken after its underscores
  (deep_feature_factorization would run into its neighbours' titles)."""
  lines = textwrap.wrap(name.replace('_', '_ '), width + 1, break_long_words=False)
  return '\n'.join(line.replace(' ', '') for line in lines)


def save_stacked(path: str, image_paths: Sequence[str], titles: Sequence[str]) -> None:
  """The PNG figures at `image_paths` one above the other, each under its title (e.g. the
  baseline's and the BCPL run's cam_prototypes.png, for reproduce.py's results)."""
  if len(image_paths) != len(titles):
    raise ValueError(f'titles: expected {len(image_paths)} (one per image), got {len(titles)}.')
  images = [np.asarray(Image.open(p).convert('RGB')) for p in image_paths]
  title_px = 30
  width = max(image.shape[1] for image in images)
  heights = [image.shape[0] + title_px for image in images]
  fig = Figure(figsize=(width / 100, sum(heights) / 100))
  top = 1.0
  for image, height, title in zip(images, heights, titles):
    top -= height / sum(heights)
    ax = fig.add_axes((0.0, top, image.shape[1] / width, image.shape[0] / sum(heights)))
    ax.imshow(image)
    ax.set_axis_off()
    ax.set_title(title, fontsize=13, fontweight='bold')
  _save(path, fig)


def save_image_grid(path: str, images, titles, title: str = '') -> None:
  """Writes a PNG grid (up to 5 columns), one grey panel per image with its title, under
  the figure's `title` when given (e.g. what the prototypes are the mean of).

  `images` is (K, H, W) or (K, H, W, 1); each panel is scaled to its own range.
  The file is written atomically.
  """
  images = np.asarray(images)
  if images.ndim == 4:
    images = images[..., 0]
  if len(images) != len(titles):
    raise ValueError(f'{len(images)} images but {len(titles)} titles.')
  cols = min(len(images), 5)
  rows = math.ceil(len(images) / cols)
  fig = Figure(figsize=(2 * cols, 2.2 * rows + (0.4 if title else 0)), layout='constrained')
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  for ax, image, panel_title in zip(axes.flat, images, titles):
    ax.imshow(image, cmap='gray')
    ax.set_title(str(panel_title), fontsize=LABEL_FONTSIZE)
  if title:
    _suptitle(fig, title)
  _save(path, fig)
