"""Writes an evaluation's outputs into `<workdir>/eval/`: metrics.json, report.md, the
figures (confusion.png, cam_prototypes.png, error_prototypes.png, overlays.png) and the same
in TensorBoard (`<workdir>/eval/tensorboard`). Every file is written atomically; an earlier
evaluation's files are replaced."""

import contextlib
import os
import shutil
from typing import Any

import numpy as np
from PIL import Image

from bcam_jax import io_utils, metric_logging
from bcam_jax.report import eval_report, figures

TEST_SCALARS = ('test_loss', 'test_accuracy', 'test_proto_loss', 'test_bcam_loss')
FIGURES = (
  'confusion.png',
  'cam_prototypes.png',
  'error_prototypes.png',
  'overlays.png',
)


def write(
  out: str,
  result: dict[str, Any],
  info,
  summary: dict[str, Any],
  confusion: np.ndarray,
  pairs: list[tuple[int, int, int]],
  prototypes: np.ndarray,
  overlays: tuple | None,
  overlay_caption: str,
) -> str:
  """Every output of one evaluation in `out`; returns its TensorBoard directory.

  `result` is the metrics.json dict; `info` the dataset's `data.DatasetInfo`; `summary` the
  per-class Grad-CAM sums of `eval_lib.make_summary_step`, `confusion` its `(C, C)` matrix
  and `pairs` the (true, predicted, count) confusions shown; `overlays` the arguments of
  `figures.save_overlays` before the class names, None for no overlays.png.
  """
  os.makedirs(out, exist_ok=True)
  _write_summary_figures(
    out,
    info,
    f'{result["model"]} {result["condition"]}',
    confusion,
    summary,
    pairs,
    np.asarray(prototypes),
  )
  if overlays is None:  # none to show: no stale overlays.png of an earlier evaluation
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(out, 'overlays.png'))
  else:
    figures.save_overlays(
      os.path.join(out, 'overlays.png'), *overlays, info.class_names, overlay_caption
    )
  io_utils.write_json(os.path.join(out, 'metrics.json'), result)
  text = eval_report.render(result, info.class_names)
  io_utils.atomic_write(os.path.join(out, 'report.md'), lambda f: f.write(text.encode()))
  return _write_tensorboard(out, result, text)


def _write_summary_figures(
  out: str, info, condition: str, confusion, summary, pairs, prototypes
) -> None:
  """confusion.png, cam_prototypes.png (paper Figs 2-5), error_prototypes.png (Fig 6)."""
  c = info.num_classes
  figures.save_confusion(os.path.join(out, 'confusion.png'), confusion, info.class_names)
  counts = np.asarray(summary['correct_counts'])
  means = np.asarray(summary['correct_map_sums']) / np.maximum(counts, 1)[:, None, None]
  figures.save_cam_prototypes(
    os.path.join(out, 'cam_prototypes.png'),
    prototypes,
    means,
    counts,
    info.class_names,
    f'{condition} on {info.name}: data prototypes and mean Grad-CAM of correctly '
    'classified test images',
  )
  error_sums = np.asarray(summary['error_map_sums'])
  error_means = (
    np.stack([error_sums[t * c + p] / n for t, p, n in pairs])
    if pairs
    else (np.zeros((0,) + prototypes.shape[1:]))
  )
  figures.save_error_prototypes(
    os.path.join(out, 'error_prototypes.png'),
    pairs,
    error_means,
    prototypes,
    info.class_names,
    'mean Grad-CAM (predicted class) of the most frequent confusions',
  )


def _write_tensorboard(out: str, result: dict[str, Any], report: str) -> str:
  """The evaluation's scalars, figures and report.md in TensorBoard at `<out>/tensorboard`
  (replacing an earlier evaluation's, as the other files of `out` are), at the
  checkpoint's step; returns that directory."""
  shutil.rmtree(metric_logging.tensorboard_dir(out), ignore_errors=True)
  logger = metric_logging.MetricLogger(out, jsonl=False)
  step = result['step']
  test = {k.removeprefix('test_'): result[k] for k in TEST_SCALARS}
  logger.write(step, f'test_{result["checkpoint"]}_checkpoint', test)
  for method, row in result['methods'].items():
    logger.write(step, method, row)
  for name in FIGURES:
    path = os.path.join(out, name)
    if os.path.exists(path):
      image = np.asarray(Image.open(path).convert('RGB')) / 255.0
      logger.write_image(step, f'figures/{name.removesuffix(".png")}', image)
  logger.write_text(step, 'report', report)
  logger.close()
  return metric_logging.tensorboard_dir(out)
