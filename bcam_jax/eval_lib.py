"""Evaluation of a trained workdir: test metrics, CAM faithfulness, the paper's figures.

`evaluate_checkpoint` restores a checkpoint and measures test loss, accuracy and the
prototype losses. `evaluate_and_report` (what `eval.py` runs) adds what its
`eval_options.EvalOptions` ask for: for each CAM method the faithfulness metrics of
`bcam_jax.explain.faithfulness` and the prototype alignment, the parameter randomisation
test (`explain.sanity`), names the cases whose figures say nothing about the maps
(`degenerate_findings`), and writes `<workdir>/eval/` (`report.eval_outputs`). Every
per-batch computation is one jitted function over a batch sharded on the mesh's `data`
axis, returning masked sums.
"""

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
  io_utils,
  objective,
  run_setup,
  split_loop,
  workdir_lock,
)
from bcam_jax.checkpointing import NoCheckpointError
from bcam_jax.eval_options import EvalOptions
from bcam_jax.explain import faithfulness
from bcam_jax.metric_logging import tensorboard_hint
from bcam_jax.report import eval_outputs
from bcam_jax.run_spec import RunSpec

# overlays.png's title for each config.eval.overlay_selection.
_SHOWN = {
  'first': 'the first test images of each class in turn',
  'misclassified': 'the first misclassified test images',
}
METHOD_METRICS = ('average_drop', 'average_gain', 'average_increase', 'insertion', 'deletion')
ROAD_METRICS = ('road_morf', 'road_lerf', 'road_combined')
DEGENERATE_TERMS = ('saturated', 'constant_map')  # faithfulness.degenerate_terms
SATURATED_SHARE = 0.5  # of the images: degenerate_findings calls the model saturated


def restore(
  spec: RunSpec | ml_collections.ConfigDict,
  workdir: str,
  checkpoint: str = 'best',
  devices: Sequence[jax.Device] | None = None,
):
  """(run setup, model variables, step) of the `best` (by validation accuracy) or `last`
  checkpoint of the training run in `workdir`, whose spec (or config) is `spec`."""
  if not os.path.isdir(workdir):
    what = 'is a file, not a directory' if os.path.exists(workdir) else 'does not exist'
    raise NoCheckpointError(f'workdir {workdir!r} {what}: give the workdir of a training run.')
  spec = RunSpec.of(spec)
  config_validation.check_matches_workdir(spec.to_config(), workdir)
  run = run_setup.setup_run(spec, devices, workdir)
  variables, step = run.state_spec.restore_variables(workdir, checkpoint)
  return run, variables, int(step)


def _test_metrics(run, variables, prototypes, checkpoint: str, step: int) -> dict[str, Any]:
  test, _ = split_loop.evaluate_split(
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
    'metric': run.objective.metric,
    'test_proto_loss': test['proto_loss'],
    'test_bcam_loss': test['bcam_loss'],
  }


def evaluate_checkpoint(
  spec: RunSpec | ml_collections.ConfigDict,
  workdir: str,
  checkpoint: str = 'best',
  devices: Sequence[jax.Device] | None = None,
  output_name: str | None = 'metrics.json',
) -> dict[str, Any]:
  """Test loss, accuracy and prototype losses (with the objective's metric) of a checkpoint
  of the run `spec` (or its config) trained in `workdir`.

  Writes `<workdir>/eval/<output_name>` (unless None) and returns the same dict.
  """
  run, variables, step = restore(spec, workdir, checkpoint, devices)
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
    run.spec.data.image_size,
    run.dtype,
    layer=options.layer,
    score_cam_chunk=options.score_cam_chunk,
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
  """(variables, prototypes, images, labels, mask) -> masked sums of the faithfulness and
  alignment terms of `method`, and its counts of degenerate images (`DEGENERATE_TERMS`)."""

  def method_step(variables, prototypes, images, labels, mask):
    pixels = data.to_pixels(images, explainer.image_size)
    logits_fn = lambda p: explainer.logits(variables, p)
    logits = logits_fn(pixels)
    targets = explainer.targets(logits, labels, options.target)
    maps = explainer.maps(method, variables, pixels, targets)
    y = cam.target_probability(logits, targets)
    o = cam.target_probability(logits_fn(faithfulness.mask_with_saliency(pixels, maps)), targets)
    baseline = jnp.asarray(explainer.mean if options.deletion_baseline == 'mean' else 0.0)
    blurred = (
      faithfulness.rise_blur(pixels, baseline, options.blur_size, options.blur_sigma)
      if options.blur_size
      else faithfulness.blur(pixels)
    )
    auc = faithfulness.insertion_deletion(
      logits_fn,
      pixels,
      maps,
      targets,
      options.n_steps,
      options.steps_per_call,
      blurred,
      baseline,
      options.pixels_per_step,
    )
    terms = faithfulness.drop_gain_increase(y, o) | auc
    terms |= faithfulness.degenerate_terms(y, o, auc, maps)
    if options.road:
      road = faithfulness.road(logits_fn, pixels, maps, targets, jax.random.key(0))
      terms |= {k: road[k] for k in ROAD_METRICS}
    terms['image_l1'] = objective.map_distance(maps, prototypes[targets], 'l1')
    terms['image_ssim'] = 1.0 - objective.map_distance(maps, prototypes[targets], 'ssim')
    mask = mask.astype(jnp.float32)
    sums = {k: jnp.sum(v * mask) for k, v in terms.items()}
    sums['count'] = jnp.sum(mask)
    sums['class_map_sums'] = cam.class_sums(maps * mask[:, None, None], targets, num_classes)[0]
    sums['class_counts'] = cam.class_sums(mask, targets, num_classes)[0]
    return sums

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
  spec: RunSpec | ml_collections.ConfigDict,
  workdir: str,
  options: EvalOptions | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
  """Everything `eval.py` measures and draws for the run `spec` (or its config) trained in
  `workdir`: `options`, default the spec's `evaluation`. Returns the dict written to
  metrics.json. Holds the workdir's lock (`workdir_lock`): no run or
  other evaluation writes there meanwhile."""
  with workdir_lock.locked(workdir):
    spec = RunSpec.of(spec)
    return _evaluate_and_report(spec, workdir, options or spec.evaluation, devices)


def _evaluate_and_report(spec: RunSpec, workdir, options, devices) -> dict[str, Any]:
  run, variables, step = restore(spec, workdir, options.checkpoint, devices)
  methods = options.methods or explain.default_methods(run.model)
  try:
    explain.check_applicable(run.model, variables, methods)  # fails now, not in an hour
  except ValueError as error:
    raise config_validation.ConfigError(f'config.eval.methods: {error}') from None
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
    n_steps=len(options.insertion_deletion_steps(run.spec.data.image_size)) - 1,
    insertion_deletion=options.insertion_deletion_convention(run.spec.data.image_size),
    dataset=info.name,
    model=spec.model.name,
    loss=str(spec.objective.kind),
    condition=conditions.describe(spec.objective, spec.model),
  )
  logging.info('Insertion/deletion: %s.', result['insertion_deletion'])
  degenerate = {}
  for method in methods:
    result['methods'][method], degenerate[method] = _method_row(
      run, variables, explainer, method, options, subset, prototypes
    )
  result['warnings'] = degenerate_findings(degenerate)
  for finding in result['warnings']:
    logging.warning('%s', finding['message'])
  if options.sanity_images:
    result['sanity'] = _randomisation_test(variables, explainer, methods, options, test)
  logging.info('Drawing the overlays and writing the report ...')
  shown = _overlay_indices(explainer, variables, test, options, run.eval_batch_size)
  result.update(overlay_selection=options.overlay_selection, overlay_images=shown.tolist())
  overlays = _overlays(explainer, variables, test, shown, methods, options.target)

  if jax.process_index() == 0:
    out = os.path.join(workdir, 'eval')
    tensorboard = eval_outputs.write(
      out,
      result,
      info,
      summary,
      confusion,
      pairs,
      np.asarray(prototypes),
      overlays,
      f'{_SHOWN[options.overlay_selection]} ({options.target} class explained)',
    )
    logging.info(
      'Evaluation report in %s: report.md, metrics.json, confusion.png, cam_prototypes.png, '
      'error_prototypes.png%s; %s',
      out,
      ', overlays.png' if overlays is not None else '',
      tensorboard_hint(tensorboard),
    )
  return result


def _randomisation_test(variables, explainer, methods, options, test) -> dict[str, Any]:
  """`explain.sanity.randomisation_test` on the first `options.sanity_images` test images,
  the targets those of the trained model."""
  n = min(options.sanity_images, len(test))
  pixels = data.to_pixels(jnp.asarray(test.images[:n]), explainer.image_size)
  logits = jax.jit(explainer.logits)(variables, pixels)
  targets = explainer.targets(logits, jnp.asarray(test.labels[:n]), options.target)
  start = time.perf_counter()
  result = explain.sanity.randomisation_test(explainer, variables, pixels, targets, methods)
  for method, means in result['methods'].items():
    logging.info(
      'randomisation test, %s: Spearman %s', method, ', '.join(f'{v:.2f}' for v in means)
    )
  logging.info('randomisation test: %.0f s', time.perf_counter() - start)
  return result


def _confusions(run, variables, explainer: explain.Explainer, num_pairs: int):
  """(summary sums, confusion matrix `(C, C)`, the `num_pairs` most frequent confusions) of
  the test split (`make_summary_step`)."""
  c, test = run.datasets.info.num_classes, run.datasets.test
  summary = split_loop.sum_over_split(
    run.mesh,
    test,
    run.eval_batch_size,
    jax.jit(make_summary_step(explainer, c)),
    variables,
    progress=split_loop.Progress('confusion and Grad-CAM prototypes', len(test)),
  )
  confusion = np.asarray(summary['confusion']).reshape(c, c).astype(np.int64)
  return summary, confusion, _top_confusions(confusion, num_pairs)


def _method_row(run, variables, explainer, method: str, options, subset, prototypes):
  """(the faithfulness and alignment metrics of `method` over `subset`, its image count and
  counts of degenerate images, `DEGENERATE_TERMS`)."""
  batch_size = split_loop.batch_for_devices(
    min(options.method_batch_size, len(subset)), run.mesh.devices.size
  )
  progress = split_loop.Progress(method, len(subset))
  step_fn = jax.jit(make_method_step(explainer, method, options, run.datasets.info.num_classes))
  sums = split_loop.sum_over_split(
    run.mesh, subset, batch_size, step_fn, variables, prototypes, progress=progress
  )
  row = {k: float(sums[k] / sums['count']) for k in METHOD_METRICS + ROAD_METRICS if k in sums}
  row.update(_alignment(sums, np.asarray(prototypes)))
  row['suite_images_per_second'] = progress.rate()
  logging.info('%s: %s', method, ', '.join(f'{k} {v:.4g}' for k, v in row.items()))
  return row, {k: int(round(float(sums[k]))) for k in ('count',) + DEGENERATE_TERMS}


def _images(k: int, n: int) -> str:
  """'12 of 200 images (6%)'."""
  return f'{k} of {n} images ({100 * k / n:.3g}%)'


def degenerate_findings(counts: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
  """The degenerate cases of an evaluation, metrics.json's `warnings`: from each method's
  image `count` and counts of `faithfulness.degenerate_terms` images (`DEGENERATE_TERMS`),
  one dict per finding with its `kind`, `methods`, `images` (of `of`) and the sentence
  (`message`) the console and report.md give.

  - `saturated`: one finding when, for every method, at least `SATURATED_SHARE` of the
    images are saturated (`faithfulness.degenerate_terms`: the target
    probability stays above `faithfulness.SATURATED_PROBABILITY` however the
    image is perturbed): most of each average then sits at the softmax's
    ceiling whatever the maps, and the drops, insertion and deletion cannot
    tell the methods apart. One method's saturated images alone are not one:
    another method's maps moving the probability show the metrics can tell.
    `images` is the smallest count over the methods.
  - `constant_maps`: one per method with any constant (all-zero) map: each such image's metrics
    say nothing about its map, so even one is reported, with its share.
  """
  findings = []
  p = faithfulness.SATURATED_PROBABILITY
  if counts and all(
    c['count'] and c['saturated'] >= SATURATED_SHARE * c['count'] for c in counts.values()
  ):
    worst = min(counts.values(), key=lambda c: c['saturated'])
    findings.append(
      {
        'kind': 'saturated',
        'methods': list(counts),
        'images': worst['saturated'],
        'of': worst['count'],
        'message': f"The model's target probability stays above {p} however the image is "
        'perturbed (masked by the map, pixels deleted or inserted on a blur) on at least '
        f'{_images(worst["saturated"], worst["count"])} for every method: its softmax is '
        'saturated, so Average Drop/Gain/Increase, insertion and deletion cannot tell the '
        'methods apart.',
      }
    )
  for method, c in counts.items():
    if c['constant_map']:
      findings.append(
        {
          'kind': 'constant_maps',
          'methods': [method],
          'images': c['constant_map'],
          'of': c['count'],
          'message': f"{method}'s maps are constant (all zero) on "
          f'{_images(c["constant_map"], c["count"])}: there Average Drop/Gain/Increase '
          "compare the image with a black one and insertion and deletion follow the pixels' "
          'positions, so its metrics say nothing about those maps.',
        }
      )
  return findings


def _overlay_indices(explainer, variables, test: data.Split, options, batch_size: int):
  """Indices into `test` of overlays.png's images: its first `num_overlays` taking the
  classes in turn (the first image of each class, then the second, ...: a folder sorted by
  class shows every class, not only its first), or its first `num_overlays` misclassified
  ones (fewer when the split has fewer errors; the scan stops once it has them)."""
  k = min(options.num_overlays, len(test))
  if options.overlay_selection == 'first':
    return across_classes(test.labels, k)
  logits = jax.jit(explainer.logits)
  found = []
  for start in range(0, len(test), batch_size):
    if len(found) >= k:
      break
    rows = slice(start, start + batch_size)
    pixels = data.to_pixels(test.images[rows], explainer.image_size)
    predictions = np.argmax(np.asarray(logits(variables, pixels)), axis=-1)
    found.extend(start + np.flatnonzero(predictions != test.labels[rows]))
  return np.asarray(found[:k], np.int64)


def across_classes(labels: np.ndarray, k: int) -> np.ndarray:
  """The first `k` indices of `labels` taking the classes in turn: each class's first
  index (classes in order), then each class's second, and so on."""
  labels = np.asarray(labels)
  ranks = np.empty(len(labels), np.int64)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    ranks[members] = np.arange(len(members))
  return np.lexsort((labels, ranks))[:k].astype(np.int64)


def _overlays(explainer, variables, test: data.Split, shown, methods, target: str):
  """(images, {method: maps}, labels, predictions) of the test images `shown`, the
  arguments of `figures.save_overlays`; None when there are none."""
  if not len(shown):
    return None
  pixels = data.to_pixels(test.images[shown], explainer.image_size)
  labels = test.labels[shown]
  logits = jax.jit(explainer.logits)(variables, pixels)
  targets = explainer.targets(logits, labels, target)
  maps_fn = jax.jit(explainer.maps, static_argnums=0)
  maps = {m: np.asarray(maps_fn(m, variables, pixels, targets)) for m in methods}
  return np.asarray(pixels), maps, labels, np.argmax(np.asarray(logits), -1)
