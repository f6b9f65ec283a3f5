"""Training end to end on tiny synthetic IDX data: outputs, devices, resume, errors."""

import importlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bcam_jax import (
  cam,
  config_validation,
  configs,
  data,
  eval_lib,
  run_setup,
  split_loop,
  steps,
  train_lib,
)
from bcam_jax import objective as objective_lib
from bcam_jax.configs import experiment
from bcam_jax.models.heads import HeadKind
from bcam_jax.run_spec import RunSpec
from tests import numerics, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  return synthetic.write_dataset(str(tmp_path_factory.mktemp('idx')))


def tiny_config(idx_dir, arg='model=simple_cnn', num_steps=30):
  config = experiment.get_config(arg)
  config.data.source = 'idx'
  config.data.idx_dir = idx_dir
  config.data.val_size = 40
  config.train.batch_size = 16
  config.train.num_steps = num_steps
  config.train.log_every_steps = 5
  config.train.checkpoint_every_steps = 10
  config.optimizer.warmup_steps = 3
  config.eval.batch_size = 24  # does not divide 40 or 60: exercises the padded batch
  return config


def leaves(tree):
  return jax.tree.leaves(jax.device_get(tree))


def test_run_learns_and_writes_its_outputs(idx_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  result = train_lib.train_and_evaluate(tiny_config(idx_dir, num_steps=40), workdir)
  assert result['step'] == 40
  assert result['test_accuracy'] > 0.5  # chance is 0.1
  for name in (
    'config.json',
    'run.json',
    'results.json',
    'metrics.jsonl',
    'prototypes_train.npy',
    'prototypes_val.npy',
    'prototypes_train.png',
    'tensorboard',
  ):
    assert os.path.exists(os.path.join(workdir, name)), name
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  train_steps = [r['step'] for r in records if r['split'] == 'train']
  assert train_steps == [5, 10, 15, 20, 25, 30, 35, 40]
  assert {r['split'] for r in records} == {'train', 'val', 'test'}
  # Under plain CE, no key repeats another (loss is the CE) or is always zero.
  assert {key for r in records if r['split'] == 'train' for key in r} == {
    'step',
    'split',
    'time',
    'loss',
    'accuracy',
    'learning_rate',
    'images_per_second',
  }
  for split in ('val', 'test'):
    assert {key for r in records if r['split'] == split for key in r} == {
      'step',
      'split',
      'time',
      'loss',
      'accuracy',
      'proto_loss',
      'bcam_loss',
    }
  run_length = json.load(open(os.path.join(workdir, 'run.json')))
  assert run_length['total_steps'] == 40 and run_length['set_by'] == 'train.num_steps'
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '30', '40']

  # eval.py's library function restores the last checkpoint and reproduces the test score.
  config = tiny_config(idx_dir, num_steps=40)
  last = eval_lib.evaluate_checkpoint(config, workdir, 'last')
  assert last['step'] == 40 and last['test_count'] == 60
  assert last['test_accuracy'] == pytest.approx(result['test_accuracy'])
  best = eval_lib.evaluate_checkpoint(config, workdir, 'best')
  assert json.load(open(os.path.join(workdir, 'eval', 'metrics.json'))) == best
  val_records = [r for r in records if r['split'] == 'val']
  best_val = max(r['accuracy'] for r in val_records)
  assert best['step'] in [r['step'] for r in val_records if r['accuracy'] == best_val]


@pytest.mark.parametrize('metric', ['l1', 'ssim'])
def test_bcpl_training_lowers_both_terms(idx_dir, tmp_path, metric):
  config = tiny_config(idx_dir, num_steps=60)
  config.loss.kind = 'bcpl'
  config.loss.metric = metric
  config.train.log_every_steps = 10
  # Unclipped, SGD at 0.1 sits at the edge of stability here (CE spikes to 12 at step 3) and
  # whether the SSIM run then diverges depends on float rounding: with LLVM's optimisation
  # off it did (CE 371 at step 20, NaN at 27). Clipped, both builds descend alike.
  config.optimizer.grad_clip_norm = 1.0
  train_lib.train_and_evaluate(config, str(tmp_path / 'bcpl'))
  records = [json.loads(line) for line in open(tmp_path / 'bcpl' / 'metrics.jsonl')]
  train = [r for r in records if r['split'] == 'train']
  assert train[-1]['ce'] < 0.5 * train[0]['ce']
  assert train[-1]['cam'] < 0.9 * train[0]['cam']
  cam_weight = config.loss.lambda_cam
  assert train[0]['loss'] == pytest.approx(train[0]['ce'] + cam_weight * train[0]['cam'], rel=1e-5)
  val = [r for r in records if r['split'] == 'val']
  assert val[-1]['bcam_loss'] < val[0]['bcam_loss']
  assert 'cam' not in val[-1]  # the CAM term is bcam_loss
  total = config.loss.lambda_class * val[-1]['loss'] + config.loss.lambda_cam * val[-1]['bcam_loss']
  assert val[-1]['total'] == pytest.approx(total, rel=1e-5)


def _tensorboard_tags(logdir):
  """Summary tags (and whether each carries an image) of the event files in `logdir`."""
  from tensorboardX.proto import event_pb2

  tags = {}
  for name in os.listdir(logdir):
    raw = open(os.path.join(logdir, name), 'rb').read()
    pos = 0
    while pos < len(raw):  # TFRecord framing: length, crc, payload, crc
      (length,) = struct.unpack('<Q', raw[pos : pos + 8])
      event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length])
      for value in event.summary.value:
        tags[value.tag] = value.HasField('image')
      pos += 16 + length
  return tags


def test_train_metrics_leave_out_duplicates_and_zeros():
  """Under plain CE the loss is the CE (one key); the CAM term and Soft-CAM's ElasticNet
  are logged only where they can be non-zero."""
  keys = lambda head, **kw: train_lib.train_metric_keys(
    objective_lib.Objective(**kw), types.SimpleNamespace(kind=HeadKind(head))
  )
  assert keys('default', kind='ce') == ('loss', 'accuracy')
  assert keys('default', kind='bcpl') == ('loss', 'ce', 'cam', 'accuracy')
  assert keys('softcam', kind='ce') == ('loss', 'accuracy')
  assert keys('softcam', kind='ce', lambda_l1=0.1) == ('loss', 'ce', 'penalty', 'accuracy')
  assert keys('softcam', kind='proto', lambda_l2=0.1) == (
    'loss',
    'ce',
    'cam',
    'penalty',
    'accuracy',
  )


def test_validation_writes_scalars_and_cam_grid_to_tensorboard(idx_dir, tmp_path):
  config = tiny_config(idx_dir, num_steps=10)
  config.loss.kind = 'proto'
  train_lib.train_and_evaluate(config, str(tmp_path / 'tb'))
  tags = _tensorboard_tags(str(tmp_path / 'tb' / 'tensorboard'))
  for tag in (
    'train/ce',
    'train/cam',
    'val/loss',
    'val/proto_loss',
    'val/bcam_loss',
    'test/accuracy',
  ):
    assert tags.get(tag) is False, tag
  assert tags['val/class_cams_vs_prototypes'] is True
  assert 'config/text_summary' in tags and 'run_length/text_summary' in tags


def test_masked_evaluation_counts_every_example_once(idx_dir):
  config = tiny_config(idx_dir)
  run = run_setup.setup_run(RunSpec.from_config(config))
  variables = jax.jit(steps.make_variables_fn(run.model, config.seed, 28))()
  split = run.datasets.test
  prototypes = jax.random.uniform(jax.random.key(0), (10, 28, 28))
  got, class_cams = split_loop.evaluate_split(run, run.eval_step(), variables, split, prototypes)
  # Naive reference: one example at a time, no padding, no sharding.
  info = run.datasets.info
  head = lambda a: run.model.apply(variables, a, method='head')
  losses, correct, proto, feats, grads = [], [], [], [], []
  for i in range(len(split)):
    x = data.preprocess(split.images[i : i + 1], info.mean, info.std, 28)
    label = int(split.labels[i])
    logits, features = run.model.apply(variables, x, train=False)
    losses.append(float(objective_lib.cross_entropy(logits, split.labels[i : i + 1])[0]))
    correct.append(int(np.argmax(logits[0]) == label))
    g = jax.grad(lambda a: head(a)[0, label])(features['cam'])
    feats.append(features['cam'][0])
    grads.append(g[0])
    m = cam.normalize_cam(cam.upsample_cam(cam.weighted_activation(features['cam'][0], g[0]), 28))
    proto.append(float(np.abs(m - prototypes[label]).mean()))
  sums = split_loop.sum_over_split(
    run.mesh, split, run.eval_batch_size, run.eval_step(), variables, prototypes
  )
  assert sums['count'] == len(split) == 60
  assert got['accuracy'] == pytest.approx(np.mean(correct))
  assert got['loss'] == pytest.approx(np.mean(losses), rel=1e-5)
  assert got['proto_loss'] == pytest.approx(np.mean(proto), rel=1e-4)
  bcam = 0.0
  for c in range(10):
    members = np.flatnonzero(split.labels == c)
    if len(members):
      m = cam.weighted_activation(
        np.mean([feats[i] for i in members], axis=0), np.mean([grads[i] for i in members], axis=0)
      )
      m = cam.normalize_cam(cam.upsample_cam(m, 28))
      np.testing.assert_allclose(class_cams[c], m, atol=1e-4)
      bcam += float(np.abs(m - prototypes[c]).mean())
  assert got['bcam_loss'] == pytest.approx(bcam, rel=1e-4)


def test_one_device_and_eight_devices_train_the_same_parameters(idx_dir, tmp_path):
  """BatchNorm statistics, the loss and Batch-CAM's class sums are over the global batch
  whatever the mesh: a ResNet18 (BatchNorm) trained with BCPL for 5 steps on 1 and on 8
  devices ends with the same parameters, BatchNorm statistics and momentum.

  In float64. In float32 the two meshes sum in different orders, and every batch of this
  model has ReLU inputs within float32 rounding of 0: one run puts such an input on one side
  of 0, the other run on the other, which switches that unit's gradient on or off, a jump
  of up to 3% of a kernel's gradient in one step; the parameters then differ, more ReLUs
  switch, and the runs are 2e-2 apart after 4 steps (`python bench/mesh_drift.py`), on any
  processor, only at a different step. In float64 the rounding is 1e-16, no ReLU input of
  a few batches lies that close to 0, and the runs stay 1e-13 apart (`--dtype=float64`):
  the training dynamics themselves do not amplify. A per-device BatchNorm (over 2 samples)
  would change the gradient by 180%.
  """
  config = tiny_config(idx_dir, 'model=resnet18', num_steps=5)
  config.model.options.width = 8
  config.loss.kind = 'bcpl'
  config.train.dtype = 'float64'
  config.train.checkpoint_every_steps = 100
  with jax.enable_x64(True):
    one = train_lib.train_and_evaluate(config, str(tmp_path / 'one'), jax.devices()[:1])
    eight = train_lib.train_and_evaluate(config, str(tmp_path / 'eight'), jax.devices()[:8])
  assert eight['num_devices'] == 8 and one['num_devices'] == 1
  assert all(p.dtype == np.float64 for p in leaves(one['state'].params))
  for part in ('params', 'batch_stats', 'opt_state'):
    numerics.assert_trees_close(
      getattr(eight['state'], part), getattr(one['state'], part), rtol=1e-9, what=part
    )
  for key in ('test_loss', 'test_accuracy', 'test_bcam_loss'):
    assert eight[key] == pytest.approx(one[key], rel=1e-9), key


def test_float64_needs_64_bit_jax(idx_dir):
  config = tiny_config(idx_dir)
  config.train.dtype = 'float64'
  with jax.enable_x64(False):
    with pytest.raises(config_validation.ConfigError, match="dtype='float64'.*JAX_ENABLE_X64=1"):
      config_validation.validate_config(config)


def _train_cmd(idx_dir, workdir, num_steps):
  return [
    sys.executable,
    'train.py',
    '--config=configs/experiment.py:model=simple_cnn',
    f'--workdir={workdir}',
    '--config.data.source=idx',
    f'--config.data.idx_dir={idx_dir}',
    '--config.data.val_size=43',
    '--config.train.batch_size=8',
    f'--config.train.num_steps={num_steps}',
    '--config.train.checkpoint_every_steps=50',
    '--config.train.log_every_steps=100',
    '--config.eval.batch_size=40',
  ]


def _final_params(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    assert manager.latest_step() == step
    return leaves(manager.restore(step)['params'])


def test_killed_run_resumes_to_bitwise_identical_parameters(idx_dir, tmp_path):
  """SIGKILL a real `train.py` process mid-epoch, restart it, compare with a clean run.

  On the CPU; $BCAM_TEST_SUBPROCESS_PLATFORMS (e.g. `cuda`) runs the three processes on
  another backend instead (bench/gpu/run.sh)."""
  num_steps = 300  # the first checkpoint (50) comes 250 steps before the end
  steps_per_epoch = (240 - 43) // 8  # 24: checkpoints every 50 steps fall mid-epoch
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('BCAM_TEST_SUBPROCESS_PLATFORMS', 'cpu'))
  clean = str(tmp_path / 'clean')
  subprocess.run(
    _train_cmd(idx_dir, clean, num_steps),
    cwd=REPO,
    env=env,
    check=True,
    capture_output=True,
    timeout=600,
  )

  killed = str(tmp_path / 'killed')
  proc = subprocess.Popen(
    _train_cmd(idx_dir, killed, num_steps),
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  ckpt_dir = os.path.join(killed, 'checkpoints')
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
      break
    time.sleep(0.01)
  assert proc.poll() is None, 'the run ended before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps_saved = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()]
  assert steps_saved and max(steps_saved) < num_steps

  resumed = subprocess.run(
    _train_cmd(idx_dir, killed, num_steps),
    cwd=REPO,
    env=env,
    check=True,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert 'Resumed from' in resumed.stderr
  resumed_at = int(resumed.stderr.split('Resumed from')[1].split('at step ')[1].split('.')[0])
  assert 0 < resumed_at < num_steps and resumed_at % steps_per_epoch  # mid-epoch
  for a, b in zip(_final_params(clean, num_steps), _final_params(killed, num_steps)):
    np.testing.assert_array_equal(a, b)

  # eval.py on the resumed workdir reports the test accuracy the training run ended with.
  subprocess.run(
    [
      sys.executable,
      'eval.py',
      *_train_cmd(idx_dir, killed, num_steps)[2:],
      '--config.eval.checkpoint=last',
      '--config.eval.methods=grad_cam',
      '--config.eval.num_images=16',
    ],
    cwd=REPO,
    env=env,
    check=True,
    capture_output=True,
    timeout=600,
  )
  evaluated = json.load(open(os.path.join(killed, 'eval', 'metrics.json')))
  trained = json.load(open(os.path.join(killed, 'results.json')))
  assert evaluated['step'] == num_steps
  assert evaluated['test_accuracy'] == pytest.approx(trained['test_accuracy'])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(idx_dir, tmp_path):
  config = tiny_config(idx_dir, num_steps=30)
  config.optimizer.learning_rate = 1e8
  config.optimizer.schedule = 'constant'
  config.train.checkpoint_every_steps = 1
  workdir = str(tmp_path / 'nan')
  with pytest.raises(train_lib.NonFiniteLossError, match=r'at step \d+') as error:
    train_lib.train_and_evaluate(config, workdir)
  bad_step = int(str(error.value).split('at step ')[1].split(' ')[0])
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    latest = manager.latest_step()
    assert latest is not None and latest <= bad_step
    assert all(np.isfinite(p).all() for p in leaves(manager.restore(latest)['params']))


def test_bfloat16_compute_trains(idx_dir, tmp_path):
  config = tiny_config(idx_dir, num_steps=20)
  config.train.dtype = 'bfloat16'
  result = train_lib.train_and_evaluate(config, str(tmp_path / 'bf16'))
  params = leaves(result['state'].params)
  assert all(p.dtype == np.float32 for p in params)  # parameters stay float32
  assert result['test_accuracy'] > 0.3 and np.isfinite(result['test_loss'])


@pytest.mark.parametrize(
  'name',
  [name for name in configs.names() if '/' not in name],
)
def test_every_config_is_valid_and_documents_its_command(name, tmp_path):
  module = importlib.import_module(f'bcam_jax.configs.{name}')
  config = module.get_config()
  if config.data.source == 'folder':  # the one field such a config cannot fill in
    config.data.folder_dir = str(tmp_path)
  config_validation.validate_config(config)
  assert f'--config=configs/{name}.py' in module.__doc__
  assert 'Expected' in module.__doc__


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('model.name', 'resnet99', "config.model.name='resnet99'.*simple_cnn"),
    ('data.name', 'cifar', "config.data.name='cifar'.*fashion_mnist"),
    ('data.source', 'web', "config.data.source='web'.*idx"),
    ('data.image_size', 0, 'config.data.image_size=0'),
    ('train.dtype', 'float16', "config.train.dtype='float16'.*bfloat16"),
    ('optimizer.name', 'lion', "config.optimizer.name='lion'.*adamw"),
    ('optimizer.schedule', 'step', "config.optimizer.schedule='step'.*warmup_cosine"),
    ('optimizer.learning_rate', -1.0, 'learning_rate=-1.0'),
    ('loss.kind', 'mse', "config.loss.kind='mse'"),
    ('loss.cam_gradient', 'detached', "config.loss.cam_gradient='detached'.*through_features"),
  ],
)
def test_invalid_config_fails_with_valid_choices(field, value, message):
  config = experiment.get_config('model=simple_cnn')
  section, key = field.split('.')
  config[section][key] = value
  with pytest.raises(config_validation.ConfigError, match=message):
    config_validation.validate_config(config)


def test_cam_gradient_through_features_is_grad_cam_only():
  """A Soft-CAM head's evidence maps have no G to hold constant: the config says so."""
  config = experiment.get_config('model=simple_cnn,loss=bcpl,head=softcam')
  config_validation.validate_config(config)
  config.loss.cam_gradient = 'through_features'
  with pytest.raises(config_validation.ConfigError, match='cam_gradient.*softcam.*no G'):
    config_validation.validate_config(config)
  config.model.head = 'default'
  config_validation.validate_config(config)


def test_impossible_sizes_fail_at_start_up(idx_dir):
  config = tiny_config(idx_dir)
  config.train.batch_size = 12  # not a multiple of 8 devices
  with pytest.raises(
    config_validation.ConfigError, match='config.train.batch_size=12.*multiple.*8'
  ):
    run_setup.setup_run(RunSpec.from_config(config))
  config = tiny_config(idx_dir)
  config.data.image_size = 2  # pooled away before the CAM layer
  with pytest.raises(
    config_validation.ConfigError,
    match='image_size=2 is too small for simple_cnn: it needs image_size >= 4',
  ):
    run_setup.setup_run(RunSpec.from_config(config))
  config = tiny_config(idx_dir)
  config.model.options.depth = 3
  with pytest.raises(
    config_validation.ConfigError,
    match=r"config.model.options=\{'depth': 3\}: unknown option.*depth",
  ):
    run_setup.setup_run(RunSpec.from_config(config))
  config = tiny_config(idx_dir)
  config.train.batch_size = 256
  with pytest.raises(
    config_validation.ConfigError, match=r'config.train.batch_size=256 .*train split \(200 images'
  ):
    run_setup.setup_run(RunSpec.from_config(config))
  config = tiny_config(idx_dir)
  config.loss.kind = 'bcpl'
  config.data.image_size = 7  # a 1x1 CAM map: its Batch-CAM loss would end in NaN
  with pytest.raises(
    config_validation.ConfigError,
    match=r'image_size=7 gives simple_cnn a 1x1 CAM map; .*image_size >= 8',
  ):
    run_setup.setup_run(RunSpec.from_config(config))
  config.loss.kind = 'ce'
  assert (
    run_setup.setup_run(RunSpec.from_config(config)).model.cam_side(7) == 1
  )  # fine without a CAM loss


def test_eval_batch_is_clamped_to_the_largest_split(idx_dir):
  config = tiny_config(idx_dir)
  config.eval.batch_size = 10**6  # would pad 40 images to a million
  assert (
    run_setup.setup_run(RunSpec.from_config(config)).eval_batch_size == 64
  )  # 60 test images, 8 devices
