"""Evaluation of a trained workdir: test metrics, CAM faithfulness, the paper's figures.

`evaluate_checkpoint` restores a checkpoint and measures test loss, accuracy and the
prototype losses. `evaluate_and_report` (what `eval.py` runs) adds, for each CAM method,
the faithfulness metrics of `bcam_jax.faithfulness` and the prototype alignment, and writes
`<workdir>/eval/`: metrics.json, report.md, confusion.png, cam_prototypes.png,
error_prototypes.png and overlays.png. Every per-batch computation is one jitted function
over a batch sharded on the mesh's `data` axis, returning masked sums.
"""

import dataclasses
import os
import time
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
  explain,
  faithfulness,
  io_utils,
  losses,
  parallel,
  train_lib,
  workdir_lock,
)
from bcam_jax.checkpointing import Checkpoints
from bcam_jax.metric_logging import format_duration
from bcam_jax.report import figures, markdown

CHECKPOINTS = ('best', 'last')
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
  run = train_lib.setup_run(config, devices)
  tx, _ = run.optimizer(total_steps=1)
  abstract_state = run.abstract_state(tx)
  ckpts = Checkpoints(workdir)
  try:
    if checkpoint == 'best':
      variables, step = ckpts.restore_best(abstract_state.model_variables())
    else:
      step = ckpts.latest_step()
      if step is None:
        raise FileNotFoundError(f'no checkpoint in {ckpts.latest.directory}.')
      variables = ckpts.restore_latest(abstract_state).model_variables()
  finally:
    ckpts.close()
  return run, variables, int(step)


def _test_metrics(run, variables, prototypes, checkpoint: str, step: int) -> dict[str, Any]:
  test, _ = train_lib.evaluate(run, run.eval_step(), variables, run.datasets.test, prototypes)
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
    'test_count': test['count'],
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
    terms['image_l1'] = losses.map_distance(maps, prototypes[targets], 'l1')
    terms['image_ssim'] = 1.0 - losses.map_distance(maps, prototypes[targets], 'ssim')
    mask = mask.astype(jnp.float32)
    sums = {k: jnp.sum(v * mask) for k, v in terms.items()}
    sums['count'] = jnp.sum(mask)
    sums['class_map_sums'] = cam.class_sums(maps * mask[:, None, None], targets, num_classes)[0]
    sums['class_counts'] = cam.class_sums(mask, targets, num_classes)[0]
    return sums, maps

  return method_step


def _accumulate(split: data.Split, batch_size: int, run, step_fn, *args, progress=None):
  """Sums of `step_fn` over `split` in padded batches; also the maps of the first batch
  when step_fn returns (sums, maps). progress(done) is called after each batch."""
  totals, first_maps, done = None, None, 0
  for images, labels, mask in data.eval_batches(split, batch_size):
    out = step_fn(*args, *parallel.shard_batch(run.mesh, images, labels, mask))
    sums, maps = out if isinstance(out, tuple) else (out, None)
    if first_maps is None and maps is not None:
      first_maps = np.asarray(maps)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    done = min(done + batch_size, len(split))
    if progress:
      progress(done)
  return jax.device_get(totals), first_maps


class _Progress:
  """Logs `name: done/total images, rate, ETA` at most every 10 s and at the end; the
  rate leaves out the first batch, which includes compilation."""

  def __init__(self, name: str, total: int):
    self.name, self.total = name, total
    self.start = self.last = time.time()
    self.first = None  # (images, time) after the first batch

  def __call__(self, done: int) -> None:
    now = time.time()
    if self.first is None:
      self.first = (done, now)
    if done < self.total and now - self.last < 10:
      return
    self.last = now
    rate = self.rate(done, now)
    logging.info(
      '%s: %d/%d images, %.1f img/s, ETA %s',
      self.name,
      done,
      self.total,
      rate,
      format_duration((self.total - done) / rate),
    )

  def rate(self, done: int | None = None, now: float | None = None) -> float:
    """Images per second after the first batch (over everything for a single batch)."""
    done, now = done or self.total, now or time.time()
    if self.first and done > self.first[0]:
      return (done - self.first[0]) / max(now - self.first[1], 1e-9)
    return done / max(now - self.start, 1e-9)


def _alignment(sums, prototypes: np.ndarray) -> dict[str, float]:
  """Class-mean map vs prototype (mean over the classes present) and per-image means."""
  counts = sums['class_counts']
  present = counts > 0
  means = sums['class_map_sums'][present] / counts[present][:, None, None]
  protos = jnp.asarray(prototypes[present])
  return {
    'alignment_l1': float(jnp.mean(losses.map_distance(means, protos, 'l1'))),
    'alignment_ssim': float(jnp.mean(1 - losses.map_distance(means, protos, 'ssim'))),
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
  c, n_dev = info.num_classes, run.mesh.devices.size

  summary_step = jax.jit(make_summary_step(explainer, c))
  summary, _ = _accumulate(
    test,
    run.eval_batch_size,
    run,
    summary_step,
    variables,
    progress=_Progress('confusion and Grad-CAM prototypes', len(test)),
  )
  confusion = np.asarray(summary['confusion']).reshape(c, c).astype(np.int64)
  per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
  pairs = _top_confusions(confusion, options.num_error_pairs)
  result.update(
    per_class_accuracy={name: float(a) for name, a in zip(info.class_names, per_class)},
    confusion=confusion.tolist(),
    top_confusions=[
      {'true': info.class_names[t], 'predicted': info.class_names[p], 'count': n}
      for t, p, n in pairs
    ],
  )

  n_images = min(options.num_images or len(test), len(test))
  subset = data.Split(test.images[:n_images], test.labels[:n_images])
  batch_size = -(-min(options.batch_size, n_images) // n_dev) * n_dev
  result.update(
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
    progress = _Progress(method, n_images)
    step_fn = jax.jit(make_method_step(explainer, method, options, c))
    sums, maps = _accumulate(
      subset, batch_size, run, step_fn, variables, prototypes, progress=progress
    )
    row = {k: float(sums[k] / sums['count']) for k in METHOD_METRICS}
    row.update(_alignment(sums, np.asarray(prototypes)))
    row['suite_images_per_second'] = progress.rate()
    result['methods'][method] = row
    overlay_maps[method] = maps[: options.num_overlays]
    logging.info('%s: %s', method, ', '.join(f'{k} {v:.4g}' for k, v in row.items()))

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
