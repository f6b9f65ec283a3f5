"""eval.py end to end on a checkpoint trained in the test: every output, every key."""

import dataclasses
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bcam_jax import (
  config_validation,
  data,
  eval_lib,
  eval_options,
  explain,
  parallel,
  split_loop,
  train_lib,
)
from bcam_jax.configs import base
from bcam_jax.report import eval_report
from tests import synthetic
from tests.test_train import REPO, _tensorboard_tags, tiny_config

METHODS = ('grad_cam', 'grad_cam_pp', 'score_cam')
FILES = (
  'metrics.json',
  'report.md',
  'confusion.png',
  'cam_prototypes.png',
  'error_prototypes.png',
  'overlays.png',
)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  idx_dir = synthetic.write_dataset(str(tmp_path_factory.mktemp('idx')))
  workdir = str(tmp_path_factory.mktemp('run'))
  train_lib.train_and_evaluate(tiny_config(idx_dir, num_steps=30), workdir)
  return idx_dir, workdir


def test_eval_py_writes_every_output(trained):
  idx_dir, workdir = trained
  cmd = [
    sys.executable,
    'eval.py',
    '--config=configs/experiment.py:model=simple_cnn',
    f'--workdir={workdir}',
    '--config.data.source=idx',
    f'--config.data.idx_dir={idx_dir}',
    '--config.data.val_size=40',
    '--config.eval.num_images=50',
    '--config.eval.method_batch_size=16',
    '--config.eval.score_cam_chunk=24',
    f'--config.eval.methods={",".join(METHODS)}',
    '--config.eval.road=True',
  ]
  proc = subprocess.run(
    cmd,
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Progress lines: a short time stamp, not absl's 60-character prefix.
  assert re.search(r'^\d\d:\d\d:\d\d score_cam: 50/50 images, [\d.]+ img/s', proc.stderr, re.M)
  assert not re.search(r'^I\d{4} .* (split_loop|eval_lib|run_setup)\.py:\d+\]', proc.stderr, re.M)
  out = os.path.join(workdir, 'eval')
  for name in FILES:
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  for name in FILES[2:]:
    assert Image.open(os.path.join(out, name)).size[0] > 100, name
  metrics = json.load(open(os.path.join(out, 'metrics.json')))
  for key in (
    'checkpoint',
    'step',
    'test_accuracy',
    'test_loss',
    'test_count',
    'per_class_accuracy',
    'confusion',
    'top_confusions',
    'methods',
    'num_images',
    'target',
    'layer',
    'n_steps',
    'insertion_deletion',
    'test_proto_loss',
    'test_bcam_loss',
    'condition',
    'warnings',
  ):
    assert key in metrics, key
  assert metrics['num_images'] == 50 and metrics['test_count'] == 60
  assert metrics['n_steps'] == 4  # CA-Stream's 8 * 28 = 224 pixels per step, 784 pixels
  assert sorted(metrics['methods']) == sorted(METHODS)
  for values in metrics['methods'].values():
    assert sorted(values) == sorted(key for key, _ in eval_report.METHOD_COLUMNS)
    assert 0 <= values['average_drop'] <= 100 and 0 <= values['average_increase'] <= 100
    assert 0 <= values['deletion'] <= 1 and 0 <= values['insertion'] <= 1
    assert 0 <= values['alignment_l1'] <= 1
    assert values['road_combined'] == pytest.approx(
      (values['road_lerf'] - values['road_morf']) / 2, abs=1e-6
    )
  confusion = np.array(metrics['confusion'])
  assert confusion.shape == (10, 10) and confusion.sum() == 60
  assert np.trace(confusion) / 60 == pytest.approx(metrics['test_accuracy'])
  text = open(os.path.join(out, 'report.md')).read()
  for method in METHODS:
    assert f'| {method} |' in text
  assert 'ROAD LeRF ↑' in text
  convention = eval_options.EvalOptions().insertion_deletion_convention(28)
  assert f'insertion and deletion AUC ({convention})' in text
  assert f'Insertion/deletion: {convention}.' in proc.stderr
  assert 'Evaluation report in' in proc.stderr and 'eval/tensorboard' in proc.stderr
  tags = _tensorboard_tags(os.path.join(out, 'tensorboard'))
  for tag in ('test_best_checkpoint/accuracy', 'score_cam/insertion', 'grad_cam/alignment_l1'):
    assert tags.get(tag) is False, tag
  for name in FILES[2:]:
    assert tags[f'figures/{name.removesuffix(".png")}'] is True, name
  assert 'report/text_summary' in tags


def test_metrics_do_not_depend_on_device_count_or_batch_padding(trained):
  """17 images in batches of 8 (padded) on 8 devices == in batches of 17 on one device.

  The float32 checkpoint is evaluated in float64: insertion and deletion rank pixels by
  saliency, and in float32 two summation orders can round a saliency tie, or a map value
  at its ReLU's 0, to different sides, moving a pixel across a step of the curve. (The
  input normalisation computes in float64 too: in float32, XLA rounded it differently in
  the programs for batches of 17 and of 1, which moved one deletion score by 2e-9.)
  """
  idx_dir, workdir = trained
  config = tiny_config(idx_dir, num_steps=30)
  config.train.dtype = 'float64'
  results = []
  with jax.enable_x64(True):
    for devices, batch_size in ((jax.devices()[:1], 17), (jax.devices(), 8)):
      options = eval_options.EvalOptions(
        methods=('grad_cam_pp',),
        num_images=17,
        method_batch_size=batch_size,
        n_steps=3,
        num_overlays=0,
      )
      results.append(eval_lib.evaluate_and_report(config, workdir, options, devices))
  one, eight = (r['methods']['grad_cam_pp'] for r in results)
  for key in eval_lib.METHOD_METRICS + ('alignment_l1', 'image_ssim'):
    assert one[key] == pytest.approx(eight[key], rel=1e-12, abs=1e-14), key
  assert results[0]['confusion'] == results[1]['confusion']


def test_insertion_deletion_convention_in_words():
  assert eval_options.EvalOptions().insertion_deletion_convention(28) == (
    "insertion from RISE's 5x5 blur of sigma 5, deletion to 0 in normalised space (the "
    "dataset mean), 4 steps of 224 pixels (CA-Stream's convention)"
  )
  assert (
    eval_options.EvalOptions()
    .insertion_deletion_convention(224)
    .endswith("28 steps of 1792 pixels (CA-Stream's convention)")
  )
  previous = eval_options.EvalOptions(n_steps=25, blur_size=0, deletion_baseline='black')
  assert previous.insertion_deletion_convention(28) == (
    'insertion from a Gaussian blur of sigma side/10 (2.8 px), deletion to black (0 in pixel '
    'space), 25 equal steps'
  )


def test_config_eval_is_the_eval_options():
  """config.eval of the base config holds every option at EvalOptions' default; a field the
  command line sets reaches the options, a comma-separated method list included."""
  config = base.get_base_config()
  assert eval_options.EvalOptions.from_config(config.eval) == eval_options.EvalOptions()
  fields = {f.name for f in dataclasses.fields(eval_options.EvalOptions)}
  assert fields <= set(config.eval), fields - set(config.eval)
  config.eval.methods = 'grad_cam, score_cam'
  config.eval.road = True
  config.eval.batch_size = 7  # the test pass's batch, not an option
  options = eval_options.EvalOptions.from_config(config.eval, num_overlays=2)
  assert options == eval_options.EvalOptions(
    methods=('grad_cam', 'score_cam'), road=True, num_overlays=2
  )
  config.eval.target = 'truth'
  with pytest.raises(ValueError, match=r"^config.eval: target='truth'; valid: \('label'"):
    eval_options.EvalOptions.from_config(config.eval)


def test_bad_options_fail_clearly(trained):
  with pytest.raises(ValueError, match='unknown CAM method'):
    eval_options.EvalOptions(methods=('gradcam',))
  with pytest.raises(ValueError, match="target='truth'"):
    eval_options.EvalOptions(target='truth')
  with pytest.raises(ValueError, match='n_steps must be >= 0, got -1'):
    eval_options.EvalOptions(n_steps=-1)
  with pytest.raises(ValueError, match='n_steps=25 and pixels_per_step=28: give one'):
    eval_options.EvalOptions(n_steps=25, pixels_per_step=28)
  with pytest.raises(ValueError, match='blur_size=4; expected an odd kernel side'):
    eval_options.EvalOptions(blur_size=4)
  with pytest.raises(ValueError, match='blur_sigma=0; expected > 0'):
    eval_options.EvalOptions(blur_sigma=0)
  with pytest.raises(ValueError, match="deletion_baseline='grey'"):
    eval_options.EvalOptions(deletion_baseline='grey')
  with pytest.raises(ValueError, match='sanity_images must be >= 0'):
    eval_options.EvalOptions(sanity_images=-1)
  idx_dir, workdir = trained
  with pytest.raises(
    config_validation.ConfigError,
    match='config.eval.methods: simple_cnn has no global-average-pool',
  ):
    eval_lib.evaluate_and_report(
      tiny_config(idx_dir), workdir, eval_options.EvalOptions(methods=('cam',), num_images=8)
    )


def test_randomisation_test_in_metrics_and_report(trained):
  """--sanity_images: each method's Spearman correlation per cascading stage, the model's
  blocks from the head down, in metrics.json and report.md."""
  idx_dir, workdir = trained
  options = eval_options.EvalOptions(
    methods=('grad_cam', 'layer_cam'), num_images=8, n_steps=2, num_overlays=0, sanity_images=8
  )
  result = eval_lib.evaluate_and_report(tiny_config(idx_dir), workdir, options)
  # A trained model: not saturated (its tiny Grad-CAM is all zero on some images, though).
  assert 'saturated' not in [finding['kind'] for finding in result['warnings']]
  sanity = result['sanity']
  assert sanity['images'] == 8
  assert sanity['layers'] == [
    'params/head_net',
    'params/backbone_net/conv3',
    'params/backbone_net/conv2',
    'params/backbone_net/conv1',
  ]
  for method in ('grad_cam', 'layer_cam'):
    values = sanity['methods'][method]
    assert len(values) == 4 and all(-1 <= v <= 1 for v in values), values
    assert min(values) < 0.9, values  # a random network does not give the trained maps
  text = open(os.path.join(workdir, 'eval', 'report.md')).read()
  assert '## Parameter randomisation test' in text and '| `backbone_net/conv2` |' in text
  saved = json.load(open(os.path.join(workdir, 'eval', 'metrics.json')))
  assert saved['sanity'] == sanity


def test_degenerate_findings_name_the_methods_and_the_share_of_images():
  """A model saturated for every method is one finding; one method saturated alone is none
  (another's maps moved the probability), nor is a saturated minority; constant maps are
  counted per method, exactly."""
  normal = {'count': 200, 'saturated': 3, 'constant_map': 0}
  assert eval_lib.degenerate_findings({'grad_cam': normal, 'score_cam': normal}) == []
  saturated = {'count': 200, 'saturated': 194, 'constant_map': 0}
  assert eval_lib.degenerate_findings({'grad_cam': saturated, 'score_cam': normal}) == []
  half = {'count': 200, 'saturated': 99, 'constant_map': 0}
  assert eval_lib.degenerate_findings({'grad_cam': half}) == []
  zeros = {'count': 200, 'saturated': 190, 'constant_map': 12}
  found = eval_lib.degenerate_findings({'grad_cam': zeros, 'score_cam': saturated})
  assert [(f['kind'], f['methods'], f['images'], f['of']) for f in found] == [
    ('saturated', ['grad_cam', 'score_cam'], 190, 200),
    ('constant_maps', ['grad_cam'], 12, 200),
  ]
  assert found[0]['message'] == (
    "The model's target probability stays above 0.99 however the image is perturbed (masked "
    'by the map, pixels deleted or inserted on a blur) on at least 190 of 200 images (95%) '
    'for every method: its softmax is saturated, so Average Drop/Gain/Increase, insertion and '
    'deletion cannot tell the methods apart.'
  )
  assert found[1]['message'].startswith(
    "grad_cam's maps are constant (all zero) on 12 of 200 images (6%): "
  )


def test_report_and_console_say_when_the_figures_are_degenerate(trained, monkeypatch, caplog):
  """A model whose logits ignore the image (its predicted class's softmax saturated on every
  image, explained) and a method
  whose maps are all zero: metrics.json's `warnings`, a WARNING line each and a note under
  report.md's method table say so, with the methods and the share of images."""
  idx_dir, workdir = trained
  monkeypatch.setattr(
    explain.Explainer, 'logits', lambda self, v, p: jnp.zeros((len(p), 10)).at[:, 3].set(30.0)
  )
  real_maps = explain.Explainer.maps
  monkeypatch.setattr(
    explain.Explainer,
    'maps',
    lambda self, m, *a, **k: real_maps(self, m, *a, **k) * (m != 'grad_cam'),
  )
  options = eval_options.EvalOptions(
    methods=('grad_cam', 'grad_cam_pp'),
    num_images=8,
    n_steps=2,
    num_overlays=0,
    target='predicted',
  )
  with caplog.at_level(logging.WARNING):
    result = eval_lib.evaluate_and_report(tiny_config(idx_dir), workdir, options)
  assert [(f['kind'], f['methods'], f['images'], f['of']) for f in result['warnings']] == [
    ('saturated', ['grad_cam', 'grad_cam_pp'], 8, 8),
    ('constant_maps', ['grad_cam'], 8, 8),
  ]
  saved = json.load(open(os.path.join(workdir, 'eval', 'metrics.json')))
  assert saved['warnings'] == result['warnings']
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warned == [f['message'] for f in result['warnings']]
  text = open(os.path.join(workdir, 'eval', 'report.md')).read()
  table_end = text.index('| grad_cam_pp |')
  for finding in result['warnings']:
    note = text.index(f'\nNote: {finding["message"]}\n')
    assert table_end < note < text.index('## Per-class test accuracy')
  assert 'on at least 8 of 8 images (100%) for every method' in text
  assert "grad_cam's maps are constant (all zero) on 8 of 8 images (100%)" in text


def test_progress_times_the_computation_not_the_dispatch():
  """The progress rate is the rate of the computation: it waits for each batch's sums
  before it reads the clock (a jitted call returns as soon as it is dispatched)."""

  @jax.jit
  def step_fn(images, labels, mask):  # about 0.1 s of matrix products per batch
    x = jnp.full((256, 256), 1e-3) * jnp.sum(mask)
    x = jax.lax.fori_loop(0, 300, lambda i, x: jnp.tanh(x @ x), x)
    return {'count': jnp.sum(mask) + 0 * jnp.sum(x)}

  split = data.Split(np.zeros((24, 28, 28, 1), np.uint8), np.zeros((24,), np.int32))
  mesh = parallel.make_mesh(jax.devices()[:1])
  step_fn(*parallel.shard_batch(mesh, *next(data.eval_batches(split, 4))))  # compiled
  progress = split_loop.Progress('slow', len(split))
  start = time.time()
  sums = split_loop.sum_over_split(mesh, split, 4, step_fn, progress=progress)
  true_rate = len(split) / (time.time() - start)
  assert sums['count'] == 24
  print('RATES', progress.rate(), true_rate)
  assert progress.rate() == pytest.approx(true_rate, rel=0.5)


def test_overlays_show_the_first_misclassified_images():
  """With overlay_selection='misclassified', overlays.png shows the first test images whose
  prediction is wrong, found batch by batch."""
  labels = np.arange(10, dtype=np.int32) % 3
  predicted = labels.copy()
  predicted[[3, 7, 8]] += 1  # three errors

  class Stub:  # an explainer whose logits predict `predicted`, image by image
    image_size = 28

    @staticmethod
    def logits(variables, pixels):
      rows = jnp.round(255 * jnp.sum(pixels, axis=(1, 2, 3))).astype(jnp.int32)  # image i: i
      return jax.nn.one_hot(jnp.asarray(predicted)[rows], 4)

  images = np.zeros((10, 28, 28, 1), np.uint8)
  images[:, 0, 0, 0] = np.arange(10)
  split = data.Split(images, labels)
  pick = lambda **kw: eval_lib._overlay_indices(
    Stub(), None, split, eval_options.EvalOptions(**kw), 4
  )
  assert pick(num_overlays=2, overlay_selection='misclassified').tolist() == [3, 7]
  assert pick(num_overlays=5, overlay_selection='misclassified').tolist() == [3, 7, 8]
  assert pick(num_overlays=2).tolist() == [0, 1]
  # A split sorted by class (an image folder) shows every class in turn.
  sorted_labels = np.repeat(np.arange(3, dtype=np.int32), [4, 3, 3])
  assert eval_lib.across_classes(sorted_labels, 5).tolist() == [0, 4, 7, 1, 5]
  with pytest.raises(ValueError, match="overlay_selection='wrong'"):
    eval_options.EvalOptions(overlay_selection='wrong')


def test_compare_evals_names_each_report_and_its_convention(tmp_path):
  """bench/compare_evals.py: one row per (report, method), two reports of one condition told
  apart by their directory (the workdir of `<workdir>/eval`), then the conventions."""
  values = dict(
    average_drop=1.5,
    average_gain=2.25,
    average_increase=7,
    insertion=0.84471,
    deletion=0.3302,
    alignment_l1=0.28716,
    alignment_ssim=0.2373,
    image_l1=0.2929,
    image_ssim=0.2322,
  )
  old = dict(dataset='mnist', model='resnet18', loss='ce', test_accuracy=0.994, n_steps=10)
  old['methods'] = {'cam': values}
  new = dict(old, condition='ce', test_accuracy=0.99375, insertion_deletion='the new one')
  new['methods'] = {'grad_cam': values, 'cam': values}
  for directory, metrics in (('mnist_ce', old), ('runs/rerun/eval', new)):
    os.makedirs(tmp_path / directory)
    with open(tmp_path / directory / 'metrics.json', 'w') as f:
      json.dump(metrics, f)
  spec = importlib.util.spec_from_file_location(
    'compare_evals', os.path.join(REPO, 'bench', 'compare_evals.py')
  )
  compare_evals = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(compare_evals)
  text = compare_evals.table([str(tmp_path / 'mnist_ce'), str(tmp_path / 'runs/rerun/eval/')])
  numbers = '1.50 | 2.25 | 7.00 | 0.8447 | 0.3302 | 0.2872 | 0.2373 | 0.2929 | 0.2322 |'
  assert text.splitlines()[2:] == [
    f'| mnist_ce | mnist | resnet18 | ce | 99.40 | cam | {numbers}',
    f'| rerun | mnist | resnet18 | ce | 99.38 | grad_cam | {numbers}',
    f'| rerun | mnist | resnet18 | ce | 99.38 | cam | {numbers}',
    '',
    'Insertion/deletion: mnist_ce: insertion from a Gaussian blur of sigma side/10, deletion '
    'to black (0 in pixel space), 10 equal steps; rerun: the new one.',
  ]
  assert compare_evals.table([str(tmp_path / 'mnist_ce')]).endswith(
    '\n\nInsertion/deletion: insertion from a Gaussian blur of sigma side/10, deletion to '
    'black (0 in pixel space), 10 equal steps.\n'
  )
