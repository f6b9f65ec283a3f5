"""Evaluation of a trained workdir: test metrics, CAM faithfulness, the paper's figures.

`evaluate_checkpoint` restores a checkpoint and measures test loss, accuracy and the
prototype losses. `evaluate_and_report` (what `eval.py` runs) adds, for each CAM method,
the faithfulness metrics of `bcam_jax.explain.faithfulness` and the prototype alignment, and writes
`<workdir>/eval/`: metrics.json, report.md, confusion.png, cam_prototypes.png,
error_prototypes.png and overlays.png. Every per-batch computation is one jitted function
over a batch sharded on the mesh's `data` axis, returning masked sums.
"""

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from bcam_jax import (
  cam,
  conditions,
  config_validation,
  data,
  evaluation,
  explain,
  io_utils,
  objective,
  run_setup,
  workdir_lock,
)
from bcam_jax.explain import faithfulness
from bcam_jax.report import figures, markdown
from bcam_jax.run_setup import CHECKPOINTS

METHOD_METRICS = ('average_drop', 'average_gain', 'average_increase', 'insertion', 'deletion')


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """What `evaluate_and_report` measures.

  methods: CAM methods (`explain.METHODS`), empty for `explain.default_methods` of the
  model (the post-hoc ones plus Soft-CAM's evidence or CA-Stream's raw attention);
  num_images: test images (the first ones) for the per-method metrics, 0 for all;
  target: the class each map explains, 'label' or 'predicted'; layer: the explained
  layer of the features dict; n_steps: insertion and deletion steps; batch_size: images
  per jitted call of a method (Score-CAM and insertion/deletion multiply it by
  score_cam_chunk and 2 * steps_per_call); num_overlays: test images in overlays.png;
  num_error_pairs: confusions in error_prototypes.png.
  """

  checkpoint: str = 'best'
  methods: tuple[str, ...] = ()
  num_images: int = 1000
  target: str = 'label'
  layer: str = 'cam'
  n_steps: int = 25
  batch_size: int = 128
  score_cam_chunk: int = 16
  steps_per_call: int = 4
  num_overlays: int = 6
  num_error_pairs: int = 8

  def __post_init__(self):
    if self.checkpoint not in CHECKPOINTS:
      raise ValueError(f'checkpoint={self.checkpoint!r}; valid: {CHECKPOINTS}')
    if self.methods:
      explain.check_methods(self.methods)
    if self.target not in explain.TARGETS:
      raise ValueError(f'target={self.target!r}; valid: {explain.TARGETS}')
    for name in ('n_steps', 'batch_size', 'score_cam_chunk', 'steps_per_call'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
    for name in ('num_images', 'num_overlays', 'num_error_pairs'):
      if getattr(self, name) < 0:
        raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')


def restore(
  config: ml_collections.ConfigDict,
  workdir: str,
  checkpoint: str = 'best',
  devices: Sequence[jax.Device] | None = None,
):
  """(run setup, model variables, step) of the `best` (by validation accuracy) or `last`
  checkpoint of `workdir`."""
  if checkpoint not in CHECKPOINTS:
    raise ValueError(f'checkpoint={checkpoint!r}; valid: {CHECKPOINTS}')
  if not os.path.isdir(workdir):
    what = 'is a file, not a directory' if os.path.exists(workdir) else 'does not exist'
    raise FileNotFoundError(f'workdir {workdir!r} {what}: give the workdir of a training run.')
  config_validation.check_matches_workdir(config, workdir)
  run = run_setup.setup_run(config, devices)
  variables, step = run.restore_variables(workdir, checkpoint)
  return run, variables, int(step)


def _test_metrics(run, variables, prototypes, checkpoint: str, step: int) -> dict[str, Any]:
  test, _ = evaluation.evaluate_split(
    run, run.eval_step(), variables, run.datasets.test, prototypes
  )
  logging.info(
    '%s checkpoint (step %d): test loss %.4f, accuracy %.2f%%',
    checkpoint,
    step,
    test['loss'],
    100 * test['accuracy'],
  )
  return {
    'checkpoint': checkpoint,
    'step': step,
    'test_loss': test['loss'],
    'test_accuracy': test['accuracy'],
    'test_count': len(run.datasets.test),
    'metric': run.config.loss.metric,
    'test_proto_loss': test['proto_loss'],
    'test_bcam_loss': test['bcam_loss'],
  }


def evaluate_checkpoint(
  config: ml_collections.ConfigDict,
  workdir: str,
  checkpoint: str = 'best',
  devices: Sequence[jax.Device] | None = None,
  output_name: str | None = 'metrics.json',
) -> dict[str, Any]:
  """Test loss, accuracy and prototype losses (with `config.loss.metric`) of a checkpoint.

  Writes `<workdir>/eval/<output_name>` (unless None) and returns the same dict.
  """
  run, variables, step = restore(config, workdir, checkpoint, devices)
  result = _test_metrics(run, variables, run.prototypes(workdir)['train'], checkpoint, step)
  if output_name and jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
    io_utils.write_json(os.path.join(workdir, 'eval', output_name), result)
  return result


def _explainer(run, options: EvalOptions) -> explain.Explainer:
  info = run.datasets.info
  return explain.Explainer(
    run.model,
    info.mean,
    info.std,
    run.config.data.image_size,
    run.dtype,
    options.layer,
    options.score_cam_chunk,
  )


def make_summary_step(explainer: explain.Explainer, num_classes: int):
  """(variables, images, labels, mask) -> masked sums for the confusion matrix and the
  figures: Grad-CAM maps of the predicted class, summed per class over the correctly
  classified images and per (true, predicted) pair over the misclassified ones."""
  c = num_classes

  def summary_step(variables, images, labels, mask):
    pixels = data.to_pixels(images, explainer.image_size)
    predictions = jnp.argmax(explainer.logits(variables, pixels), axis=-1)
    maps = explainer.maps('grad_cam', variables, pixels, predictions)
    mask = mask.astype(jnp.float32)
    correct = (predictions == labels).astype(jnp.float32) * mask
    pairs = labels * c + predictions
    return {
      'confusion': jax.ops.segment_sum(mask, pairs, c * c),
      'correct_map_sums': jax.ops.segment_sum(maps * correct[:, None, None], labels, c),
      'correct_counts': jax.ops.segment_sum(correct, labels, c),
      'error_map_sums': jax.ops.segment_sum(maps * (mask - correct)[:, None, None], pairs, c * c),
    }

  return summary_step


def make_method_step(
  explainer: explain.Explainer, method: str, options: EvalOptions, num_classes: int
):
  """(variables, prototypes, images, labels, mask) -> (masked sums of the faithfulness
  and alignment terms of `method`, the batch's saliency maps)."""

  def method_step(variables, prototypes, images, labels, mask):
    pixels = data.to_pixels(images, explainer.image_size)
    logits_fn = lambda p: explainer.logits(variables, p)
    logits = logits_fn(pixels)
    targets = explainer.targets(logits, labels, options.target)
    maps = explainer.maps(method, variables, pixels, targets)
    y = cam.target_probability(logits, targets)
    o = cam.target_probability(logits_fn(faithfulness.mask_with_saliency(pixels, maps)), targets)
    terms = faithfulness.drop_gain_increase(y, o) | faithfulness.insertion_deletion(
      logits_fn, pixels, maps, targets, options.n_steps, options.steps_per_call
    )
    terms['image_l1'] = objective.map_distance(maps, prototypes[targets], 'l1')
    terms['image_ssim'] = 1.0 - objective.map_distance(maps, prototypes[targets], 'ssim')
    mask = mask.astype(jnp.float32)
    sums = {k: jnp.sum(v * mask) for k, v in terms.items()}
    sums['count'] = jnp.sum(mask)
    sums['class_map_sums'] = cam.class_sums(maps * mask[:, None, None], targets, num_classes)[0]
    sums['class_counts'] = cam.class_sums(mask, targets, num_classes)[0]
    return sums, maps

  return method_step


def _alignment(sums, prototypes: np.ndarray) -> dict[str, float]:
  """Class-mean map vs prototype (mean over the classes present) and per-image means."""
  counts = sums['class_counts']
  present = counts > 0
  means = sums['class_map_sums'][present] / counts[present][:, None, None]
  protos = jnp.asarray(prototypes[present])
  return {
    'alignment_l1': float(jnp.mean(objective.map_distance(means, protos, 'l1'))),
    'alignment_ssim': float(jnp.mean(1 - objective.map_distance(means, protos, 'ssim'))),
    'image_l1': float(sums['image_l1'] / sums['count']),
    'image_ssim': float(sums['image_ssim'] / sums['count']),
  }


def _top_confusions(confusion: np.ndarray, k: int) -> list[tuple[int, int, int]]:
  """The k most frequent (true, predicted, count) errors, most frequent first."""
  errors = confusion.copy()
  np.fill_diagonal(errors, 0)
  order = np.argsort(-errors, axis=None, kind='stable')[:k]
  pairs = [tuple(int(v) for v in np.unravel_index(i, errors.shape)) for i in order]
  return [(t, p, int(errors[t, p])) for t, p in pairs if errors[t, p] > 0]


def evaluate_and_report(
  config: ml_collections.ConfigDict,
  workdir: str,
  options: EvalOptions = EvalOptions(),
  devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
  """Everything `eval.py` measures and draws; returns the dict written to metrics.json.
  Holds the workdir's lock (`workdir_lock`): no run or other evaluation writes there
  meanwhile."""
  with workdir_lock.locked(workdir):
    return _evaluate_and_report(config, workdir, options, devices)


def _evaluate_and_report(config, workdir, options, devices) -> dict[str, Any]:
  run, variables, step = restore(config, workdir, options.checkpoint, devices)
  methods = options.methods or explain.default_methods(run.model)
  explain.check_applicable(run.model, variables, methods)  # fails now, not in an hour
  info, test = run.datasets.info, run.datasets.test
  prototypes = run.prototypes(workdir)['train']
  result = _test_metrics(run, variables, prototypes, options.checkpoint, step)
  explainer = _explainer(run, options)
  summary, confusion, pairs = _confusions(run, variables, explainer, options.num_error_pairs)
  per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
  n_images = min(options.num_images or len(test), len(test))
  subset = data.Split(test.images[:n_images], test.labels[:n_images])
  result.update(
    per_class_accuracy={name: float(a) for name, a in zip(info.class_names, per_class)},
    confusion=confusion.tolist(),
    top_confusions=[
      {'true': info.class_names[t], 'predicted': info.class_names[p], 'count': n}
      for t, p, n in pairs
    ],
    methods={},
    num_images=n_images,
    target=options.target,
    layer=options.layer,
    n_steps=options.n_steps,
    dataset=info.name,
    model=config.model.name,
    loss=config.loss.kind,
    condition=conditions.describe(config),
  )
  overlay_maps = {}
  for method in methods:
    row, maps = _method_row(run, variables, explainer, method, options, subset, prototypes)
    result['methods'][method] = row
    overlay_maps[method] = maps[: options.num_overlays]

  if jax.process_index() == 0:
    out = os.path.join(workdir, 'eval')
    os.makedirs(out, exist_ok=True)
    _write_summary_figures(
      out,
      info,
      f'{config.model.name} {result["condition"]}',
      confusion,
      summary,
      pairs,
      np.asarray(prototypes),
    )
    _write_overlays(out, info, subset, overlay_maps, variables, explainer)
    io_utils.write_json(os.path.join(out, 'metrics.json'), result)
    text = markdown.render(result, info.class_names).encode()
    io_utils.atomic_write(os.path.join(out, 'report.md'), lambda f: f.write(text))
    logging.info(
      'wrote %s/{metrics.json,report.md,confusion.png,cam_prototypes.png,'
      'error_prototypes.png,overlays.png}',
      out,
    )
  return result


def _confusions(run, variables, explainer: explain.Explainer, num_pairs: int):
  """(summary sums, confusion matrix `(C, C)`, the `num_pairs` most frequent confusions) of
  the test split (`make_summary_step`)."""
  c, test = run.datasets.info.num_classes, run.datasets.test
  summary, _ = evaluation.sum_over_split(
    run.mesh,
    test,
    run.eval_batch_size,
    jax.jit(make_summary_step(explainer, c)),
    variables,
    progress=evaluation.Progress('confusion and Grad-CAM prototypes', len(test)),
  )
  confusion = np.asarray(summary['confusion']).reshape(c, c).astype(np.int64)
  return summary, confusion, _top_confusions(confusion, num_pairs)


def _method_row(run, variables, explainer, method: str, options, subset, prototypes):
  """(faithfulness and alignment metrics of `method` over `subset`, the maps of its first
  batch)."""
  batch_size = evaluation.batch_for_devices(
    min(options.batch_size, len(subset)), run.mesh.devices.size
  )
  progress = evaluation.Progress(method, len(subset))
  step_fn = jax.jit(make_method_step(explainer, method, options, run.datasets.info.num_classes))
  sums, maps = evaluation.sum_over_split(
    run.mesh, subset, batch_size, step_fn, variables, prototypes, progress=progress
  )
  row = {k: float(sums[k] / sums['count']) for k in METHOD_METRICS}
  row.update(_alignment(sums, np.asarray(prototypes)))
  row['suite_images_per_second'] = progress.rate()
  logging.info('%s: %s', method, ', '.join(f'{k} {v:.4g}' for k, v in row.items()))
  return row, maps


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


def _write_overlays(
  out: str, info, subset: data.Split, overlay_maps, variables, explainer: explain.Explainer
) -> None:
  """overlays.png: the first images of `subset` under each method's map."""
  k = min(len(v) for v in overlay_maps.values())
  if not k:
    return
  pixels = data.to_pixels(subset.images[:k], explainer.image_size)
  logits = jax.jit(explainer.logits)(variables, pixels)
  figures.save_overlays(
    os.path.join(out, 'overlays.png'),
    np.asarray(pixels)[..., 0],
    {m: v[:k] for m, v in overlay_maps.items()},
    subset.labels[:k],
    np.argmax(np.asarray(logits), -1),
    info.class_names,
  )
