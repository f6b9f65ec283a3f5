"""Training from published weights (config.init.pretrained): what is taken from the file and
what starts fresh, the first conv summed over RGB for grey images, ImageNet normalisation,
the frozen backbone, the config checks, and `configs/finetune.py`'s three protocols (BCPL,
CA-Stream on a frozen backbone, Soft-CAM) trained on an image folder and explained, with
ResNet-50 at width 2 (stage widths 2-16, Bottleneck outputs 8-64) on 64 px images."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from bcam_jax import (
  config_validation,
  data,
  eval_lib,
  eval_options,
  models,
  run_setup,
  train_lib,
)
from bcam_jax.configs import finetune
from bcam_jax.models import pretrained
from bcam_jax.run_spec import RunSpec
from tests import entry_points, synthetic
from tests.weights_files import resnet_arrays, save_safetensors

REPO = entry_points.REPO
SIDE = 64  # the ImageNet stem and four stages: a 2x2 CAM map
WIDTH = 2


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  """(arrays, .safetensors path) of a ResNet-50 at width 2 with 1000 classes, RGB."""
  arrays = resnet_arrays(50, WIDTH, classes=1000)
  return arrays, save_safetensors(arrays, tmp_path_factory.mktemp('w') / 'r50.safetensors')


def _resnet50(classes=5, **kwargs):
  return models.get_model('resnet50', classes, stem='imagenet', width=WIDTH, **kwargs)


def _initial(model, channels=3):
  return models.init_variables(model, jax.random.key(1), SIDE, channels)


def _flat(tree):
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree))


def test_backbone_comes_from_the_file_and_the_classifier_is_fresh(weights):
  arrays, path = weights
  model = _resnet50()
  initial = _initial(model)
  loaded, notes = pretrained.pretrained_variables('resnet50', model, path, initial)
  params, stats = loaded['params']['backbone_net'], loaded['batch_stats']['backbone_net']
  np.testing.assert_array_equal(
    params['stem_conv']['kernel'], arrays['conv1.weight'].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    params['stage4_block3']['conv3']['kernel'],
    arrays['layer4.2.conv3.weight'].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    params['stage1_block1']['proj_bn']['scale'], arrays['layer1.0.downsample.1.weight']
  )
  np.testing.assert_array_equal(
    stats['stage3_block6']['bn2']['var'], arrays['layer3.5.bn2.running_var']
  )
  # Every file tensor but the classifier's (and the step counters) is placed once.
  backbone = [p for p in _flat(loaded) if p[1] == 'backbone_net']
  file_tensors = [k for k in arrays if not k.endswith('num_batches_tracked') and k[:3] != 'fc.']
  assert len(backbone) == len(file_tensors)
  for key in ('kernel', 'bias'):  # the classifier keeps its initial values, for 5 classes
    np.testing.assert_array_equal(
      loaded['params']['head_net']['dense'][key], initial['params']['head_net']['dense'][key]
    )
  assert loaded['params']['head_net']['dense']['kernel'].shape == (64, 5)
  assert notes == ['initialised fresh: head_net/dense', 'not used: fc.bias, fc.weight']


def test_grey_images_see_the_first_conv_summed_over_rgb(weights):
  """A grey image through the summed conv gives the features of the same image as three
  equal channels through the file's RGB conv: the conv is linear in its input channels."""
  arrays, path = weights
  grey_model = _resnet50()
  grey, notes = pretrained.pretrained_variables(
    'resnet50', grey_model, path, _initial(grey_model, channels=1)
  )
  kernel = grey['params']['backbone_net']['stem_conv']['kernel']
  np.testing.assert_allclose(
    kernel, arrays['conv1.weight'].sum(1, keepdims=True).transpose(2, 3, 1, 0), rtol=1e-6
  )
  assert notes[0] == 'conv1.weight summed over its 3 input channels for 1-channel images'
  rgb_model, rgb = models.load_pretrained('resnet50', path, num_classes=5)
  x = jax.random.normal(jax.random.key(2), (2, SIDE, SIDE, 1))
  features = lambda m, v, images: m.apply(v, images, method='backbone')['cam']
  want = features(rgb_model, rgb, jnp.repeat(x, 3, axis=-1))
  np.testing.assert_allclose(
    features(grey_model, grey, x), want, rtol=2e-5, atol=2e-5 * np.abs(want).max()
  )


@pytest.mark.parametrize(
  'kind, fresh',
  [
    (dict(head='softcam'), 'head_net/evidence'),
    (dict(pooling='ca_stream'), 'head_net/dense, head_net/pool/stream_out, stream, stream/'),
  ],
  ids=['softcam', 'ca_stream'],
)
def test_heads_without_published_weights_start_fresh(weights, kind, fresh):
  _, path = weights
  model = _resnet50(**kind)
  initial = _initial(model)
  loaded, notes = pretrained.pretrained_variables('resnet50', model, path, initial)
  reference, _ = pretrained.pretrained_variables(
    'resnet50', _resnet50(), path, _initial(_resnet50())
  )
  jax.tree.map(
    np.testing.assert_array_equal,
    loaded['params']['backbone_net'],
    reference['params']['backbone_net'],
  )
  assert notes[0].startswith('initialised fresh: ' + fresh)
  for path_, value in _flat(loaded['params']).items():
    if path_[0] != 'backbone_net':
      np.testing.assert_array_equal(value, _flat(initial['params'])[path_], err_msg=str(path_))


def test_a_vit_last_block_goes_where_the_head_has_it(tmp_path):
  """The default head runs the last block (head_net/block); Soft-CAM's backbone does
  (encoderblock_{depth-1}): both take the file's blocks.{depth-1}. Read from a converted
  directory."""
  options = dict(hidden=16, depth=2, heads=2, mlp_dim=32, patch_size=16)
  source = models.get_model('vit_s16', 7, **options)
  source_vars = models.init_variables(source, jax.random.key(3), 32, 3)
  converted = str(tmp_path / 'vit')
  info = {'name': 'vit_s16', 'num_classes': 7, 'options': options, 'image_size': 32, 'channels': 3}
  pretrained.save_converted(converted, source_vars, info)
  block = source_vars['params']['head_net']['block']
  for head, where in (
    ('default', ('head_net', 'block')),
    ('softcam', ('backbone_net', 'encoderblock_1')),
  ):
    model = models.get_model('vit_s16', 3, head=head, **options)
    loaded, _ = pretrained.pretrained_variables('vit_s16', model, converted, _vit_initial(model))
    jax.tree.map(np.testing.assert_array_equal, loaded['params'][where[0]][where[1]], block)
  model = models.get_model('vit_s16', 3, **options)
  with pytest.raises(
    models.WeightsError,
    match=r"'pos_embed' has shape \(1, 5, 16\), expected \(1, 17, 16\); "
    r'the weights are for 32x32 images: set config.data.image_size=32',
  ):
    pretrained.pretrained_variables(
      'vit_s16', model, converted, models.init_variables(model, jax.random.key(0), 64, 3)
    )


def _vit_initial(model):
  return models.init_variables(model, jax.random.key(0), 32, 3)


def test_weights_for_other_options_are_named(weights, tmp_path):
  _, path = weights
  model = models.get_model('resnet50', 5, stem='imagenet', width=4)
  with pytest.raises(
    models.WeightsError,
    match=r'holds resnet50 weights with width=2; this model has width=4 '
    r'\(config.model.options.width=2 fits them\)',
  ):
    pretrained.pretrained_variables('resnet50', model, path, _initial(model))
  converted = str(tmp_path / 'r18')
  pretrained.convert(
    'resnet18', save_safetensors(resnet_arrays(18, WIDTH), tmp_path / 'r18.safetensors'), converted
  )
  with pytest.raises(models.WeightsError, match='holds resnet18 weights, not resnet50'):
    pretrained.pretrained_variables('resnet50', _resnet50(), converted, _initial(_resnet50()))


def test_imagenet_normalisation():
  info = data.DatasetInfo('x', 2, mean=(0.5,), std=(0.2,), class_names=('a', 'b'), channels=1)
  assert data.imagenet_normalized(info).mean == (0.449,)
  assert data.imagenet_normalized(info).std == (0.226,)
  rgb = data.imagenet_normalized(data.DatasetInfo('x', 2, 0.5, 0.2, ('a', 'b'), channels=3))
  assert (rgb.mean, rgb.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  config = finetune.get_config('bcpl')
  config.data.folder_dir = REPO
  assert RunSpec.from_config(config).normalization == 'dataset'  # no weights: the data's
  config.init.pretrained = 'w.pth'
  assert RunSpec.from_config(config).normalization == 'imagenet'
  config.data.normalization = 'dataset'
  assert RunSpec.from_config(config).normalization == 'dataset'


@pytest.mark.parametrize(
  'fields, message',
  [
    (
      {'model.name': 'simple_cnn', 'model.options': {}},
      r'needs a model with published weights; '
      r"config.model.name='simple_cnn' is not one of \('resnet18'",
    ),
    ({'init_from': REPO}, r'config.init.pretrained and config.init_from both set'),
    (
      {'model.pooling': 'ca_stream', 'model.ca_stream.freeze_backbone': True},
      r'published weights bring no classifier for your classes: '
      r'use config.init.freeze_backbone=True',
    ),
    (
      {'init.pretrained': '', 'init.freeze_backbone': True},
      r'config.init.freeze_backbone=True needs weights to freeze',
    ),
    (
      {'data.normalization': 'cifar'},
      r"config.data.normalization='cifar' is not valid; "
      r"choose one of \('auto', 'dataset', 'imagenet'\)",
    ),
  ],
  ids=['model', 'init_from', 'ca_stream_freeze', 'freeze_alone', 'normalization'],
)
def test_init_fields_are_checked(fields, message):
  config = finetune.get_config('bcpl')
  config.data.folder_dir = REPO
  config.init.pretrained = 'w.pth'
  for key, value in fields.items():
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  with pytest.raises(config_validation.ConfigError, match=message) as error:
    config_validation.validate_config(config)
  assert '\n' not in str(error.value)


@pytest.fixture(scope='module')
def grey_folder(tmp_path_factory):
  """A 1-channel folder (read as grey from RGB PNGs: data.channels=1) at 64 px."""
  root = str(tmp_path_factory.mktemp('folder'))
  return synthetic.write_folder(root, {'train': 8, 'val': 2, 'test': 3}, size=SIDE)


def _finetune_config(protocol, folder, weights_path):
  config = finetune.get_config(protocol)
  config.model.options.width = WIDTH
  config.init.pretrained = weights_path
  config.data.folder_dir = folder
  config.data.channels = 1
  config.data.image_size = SIDE
  config.train.batch_size = 8
  config.train.num_steps = 4
  config.train.log_every_steps = 2
  config.optimizer.warmup_steps = 1
  config.eval.batch_size = 9
  return config


# What each protocol explains with in eval.py, and whether its backbone trains.
# (bcpl goes through train.py and eval.py below.)
PROTOCOLS = {
  'ca_stream': (('raw_attention', 'grad_cam'), False),
  'softcam': (('evidence', 'grad_cam'), True),
}


@pytest.mark.parametrize('protocol', PROTOCOLS)
def test_each_protocol_fine_tunes_and_is_explained(protocol, grey_folder, weights, tmp_path):
  arrays, path = weights
  config = _finetune_config(protocol, grey_folder, path)
  workdir = str(tmp_path / protocol)
  result = train_lib.train_and_evaluate(config, workdir)
  assert result['step'] == 4 and np.isfinite(result['test_loss'])
  params = result['state'].params
  stats = result['state'].batch_stats['backbone_net']
  file_kernel = arrays['layer2.0.conv1.weight'].transpose(2, 3, 1, 0)
  trained_kernel = np.asarray(params['backbone_net']['stage2_block1']['conv1']['kernel'])
  methods, backbone_trains = PROTOCOLS[protocol]
  if backbone_trains:
    assert not np.array_equal(trained_kernel, file_kernel)
    assert not np.array_equal(stats['stem_bn']['mean'], arrays['bn1.running_mean'])
  else:  # frozen: the file's weights and statistics exactly, the stream and classifier trained
    np.testing.assert_array_equal(trained_kernel, file_kernel)
    np.testing.assert_array_equal(stats['stem_bn']['mean'], arrays['bn1.running_mean'])
    run = run_setup.setup_run(RunSpec.from_config(config))
    initial = run.state_spec.initial(run.optimizer(4)[0]).params
    for part in (('stream', 'query'), ('head_net', 'dense', 'kernel')):
      trained, start = params, initial
      for key in part:
        trained, start = trained[key], start[key]
      assert not np.array_equal(trained, start), part
    np.testing.assert_array_equal(  # the file's statistics: the frozen backbone in eval mode
      stats['stage4_block3']['bn3']['var'], arrays['layer4.2.bn3.running_var']
    )
  recorded = json.load(open(os.path.join(workdir, 'config.json')))
  assert recorded['init'] == {'pretrained': path, 'freeze_backbone': not backbone_trains}
  options = eval_options.EvalOptions(methods=methods, num_overlays=2, sanity_images=0)
  report = eval_lib.evaluate_and_report(config, workdir, options=options)
  assert report['test_count'] == 9
  for method in methods:
    assert np.isfinite(report['methods'][method]['image_l1']), method
  assert os.path.getsize(os.path.join(workdir, 'eval', 'cam_prototypes.png')) > 0


def test_train_py_starts_from_the_weights_file(grey_folder, weights, tmp_path):
  """The command line: `train.py --config=configs/finetune.py:bcpl` with the weights, its
  log saying what came from the file, `eval.py` explaining the run, then a one-line error
  for a missing weights file."""
  _, path = weights
  workdir = str(tmp_path / 'run')
  common = [
    '--config=configs/finetune.py:bcpl',
    f'--config.data.folder_dir={grey_folder}',
    '--config.data.channels=1',
    f'--config.data.image_size={SIDE}',
    f'--config.model.options.width={WIDTH}',
    '--config.train.batch_size=8',
    '--config.train.num_steps=2',
    '--config.eval.batch_size=9',
  ]
  run = lambda *args: entry_points.run('train.py', *args)
  proc = run(*common, f'--workdir={workdir}', f'--config.init.pretrained={path}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (
    f'Initialised from the weights in {path}; conv1.weight summed over its 3 input channels'
    in proc.stderr
  )
  assert "Normalising with ImageNet's mean (0.449,) and std (0.226,)" in proc.stderr
  assert os.path.exists(os.path.join(workdir, 'results.json'))
  entry_points.run(
    'eval.py',
    *common,
    f'--workdir={workdir}',
    f'--config.init.pretrained={path}',
    '--config.eval.methods=grad_cam',
    '--config.eval.num_overlays=2',
    '--config.eval.sanity_images=0',
    check=True,
  )
  metrics = json.load(open(os.path.join(workdir, 'eval', 'metrics.json')))
  assert metrics['test_count'] == 9 and np.isfinite(metrics['methods']['grad_cam']['image_l1'])
  missing = str(tmp_path / 'absent.pth')
  proc = run(*common, f'--workdir={tmp_path / "other"}', f'--config.init.pretrained={missing}')
  assert proc.returncode == 1
  assert (
    proc.stderr.strip().splitlines()[-1]
    == f"error: config.init.pretrained='{missing}': no such file or directory."
  )


@pytest.mark.parametrize(
  'name, options, side, loss',
  [
    (
      'vit_s16',
      {'hidden': 16, 'depth': 2, 'heads': 2, 'mlp_dim': 32, 'patch_size': 16},
      32,
      'bcpl',
    ),
    ('convnext_tiny', {'stem_stride': 4, 'width': 2}, 64, 'proto'),
  ],
)
def test_vit_and_convnext_fine_tune(name, options, side, loss, tmp_path):
  """timm's families from a converted directory (RGB, 7 classes) on a grey folder: the
  patch embedding or stem summed over RGB; ViT-S trained with BCPL and explained, ConvNeXt-T
  with the per-image Prototype Loss."""
  source = models.get_model(name, 7, **options)
  converted = str(tmp_path / 'weights')
  info = {'name': name, 'num_classes': 7, 'options': options, 'image_size': side, 'channels': 3}
  pretrained.save_converted(
    converted, models.init_variables(source, jax.random.key(4), side, 3), info
  )
  folder = synthetic.write_folder(
    str(tmp_path / 'data'), {'train': 8, 'val': 2, 'test': 3}, size=side
  )
  config = _finetune_config('bcpl', folder, converted)
  config.model.name = name
  config.model.options = options
  config.data.image_size = side
  config.train.num_steps = 2
  config.loss.kind = loss
  workdir = str(tmp_path / 'run')
  result = train_lib.train_and_evaluate(config, workdir)
  assert result['step'] == 2 and np.isfinite(result['test_loss'])
  first = 'patch_embed' if name == 'vit_s16' else 'stem_conv'
  assert result['state'].params['backbone_net'][first]['kernel'].shape[2] == 1
  if name != 'vit_s16':
    return  # eval.py on ConvNeXt: as on every model; its compilation is the test's cost
  options_ = eval_options.EvalOptions(methods=('grad_cam',), num_overlays=2, sanity_images=0)
  report = eval_lib.evaluate_and_report(config, workdir, options=options_)
  assert np.isfinite(report['methods']['grad_cam']['image_l1'])
