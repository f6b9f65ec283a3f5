"""Tests of bcam_jax.models.pretrained: published state_dicts as our variables.

torchvision's ResNets and timm's ViT and ConvNeXt (tiny widths, random weights and BatchNorm
statistics) give the logits of our models with their converted weights; a safetensors file
written from numpy without torch places each array; keys that do not fit are named; the
parameter counts are the published ones; `bcam-weights convert` writes an Orbax copy that
loads back.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from bcam_jax import cli
from bcam_jax.commands import weights as weights_command
from bcam_jax.models import WeightsError, get_model, load_pretrained, param_count, pretrained
from tests.weights_files import resnet_arrays, save_safetensors

# ---------------------------------------------------------------- parameter counts

# 1000 classes, RGB, the ImageNet stem (224x224 for the ViTs, whose position embedding
# depends on it): torchvision's and timm's counts.
PUBLISHED = {
  'resnet18': 11_689_512,
  'resnet34': 21_797_672,
  'resnet50': 25_557_032,
  'resnet101': 44_549_160,
  'vit_s16': 22_050_664,
  'vit_b16': 86_567_656,
  'convnext_tiny': 28_589_128,
}
_IMAGENET = {'resnet': {'stem': 'imagenet'}, 'convnext': {'stem_stride': 4}, 'vit': {}}


def _published_model(name):
  return get_model(name, 1000, **_IMAGENET[name.split('_')[0].rstrip('0123456789')])


@pytest.mark.parametrize('name', PUBLISHED)
def test_published_parameter_counts(name):
  model = _published_model(name)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  assert param_count(variables['params']) == PUBLISHED[name]


# ---------------------------------------------------------------- against torch


def _randomise(module, torch):
  """Every parameter and BatchNorm statistic of `module` drawn at random, so no layer is
  trivial (ConvNeXt's layer scales start at 1e-6, BatchNorm at the identity).
  torchvision's BatchNorm scales are `bn*.weight` and `downsample.1.weight`."""
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, tensor in module.state_dict().items():
      if name.endswith('num_batches_tracked'):
        continue
      noise = torch.randn(tensor.shape, generator=generator)
      if name.endswith('running_var'):
        tensor.copy_(0.5 + noise.abs())
      elif name.endswith(('gamma', 'layer_scale')) or (
        tensor.ndim == 1 and ('bn' in name or 'downsample.1.weight' in name)
      ):
        # Scales below 1 keep deep residual stacks' logits of order 1.
        tensor.copy_(0.4 + 0.1 * noise)
      else:
        tensor.copy_(tensor + 0.1 * noise)
  return module.eval()


def _torch_model(name, torch):
  if name.startswith('resnet'):
    torchvision = pytest.importorskip('torchvision')
    # torchvision's stem is 64 wide whatever the options, so these are full width.
    return getattr(torchvision.models, name)(num_classes=7)
  timm = pytest.importorskip('timm')
  if name == 'vit_s16':
    return timm.models.vision_transformer.VisionTransformer(
      img_size=16, patch_size=4, num_classes=7, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2
    )
  return timm.models.convnext.ConvNeXt(num_classes=7, dims=(8, 16, 32, 64))


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch under numpy 2
@pytest.mark.parametrize(
  'name,side',
  [('resnet18', 32), ('resnet50', 32), ('vit_s16', 16), ('convnext_tiny', 32)],
)
def test_logits_equal_torch(name, side, tmp_path):
  """The converted model's logits are torch's on the same images (NCHW there, NHWC here)."""
  torch = pytest.importorskip('torch')
  module = _randomise(_torch_model(name, torch), torch)
  path = str(tmp_path / 'weights.pth')
  torch.save(module.state_dict(), path)
  images = np.random.default_rng(1).normal(size=(2, 3, side, side)).astype(np.float32)
  with torch.no_grad():
    want = module(torch.from_numpy(images)).numpy()
  model, variables = load_pretrained(name, path)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])(
    variables, images.transpose(0, 2, 3, 1)
  )
  assert got.shape == want.shape == (2, 7)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_torchvision_convnext_names(tmp_path):
  """torchvision's ConvNeXt state_dict (features.*, classifier.*, layer scales (C, 1, 1))
  loads as timm's does: the same tensors give the same variables."""
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  timm = pytest.importorskip('timm')
  from torchvision.models.convnext import CNBlockConfig

  configs = [CNBlockConfig(8, 16, 3), CNBlockConfig(16, 32, 3), CNBlockConfig(32, 64, 9)]
  configs.append(CNBlockConfig(64, None, 3))
  tv = _randomise(torchvision.models.convnext.ConvNeXt(configs, num_classes=7), torch)
  ours = timm.models.convnext.ConvNeXt(num_classes=7, dims=(8, 16, 32, 64))
  tv_state, timm_shapes = tv.state_dict(), ours.state_dict()
  assert len(tv_state) == len(timm_shapes)
  # Both list the tensors in module order; timm's layer scales are (C,), torchvision's (C, 1, 1).
  timm_state = {k: v.reshape(timm_shapes[k].shape) for k, v in zip(timm_shapes, tv_state.values())}
  torch.save(tv_state, str(tmp_path / 'tv.pth'))
  torch.save(timm_state, str(tmp_path / 'timm.pth'))
  _, from_tv = load_pretrained('convnext_tiny', str(tmp_path / 'tv.pth'))
  _, from_timm = load_pretrained('convnext_tiny', str(tmp_path / 'timm.pth'))
  jax.tree.map(np.testing.assert_array_equal, from_tv, from_timm)


# ---------------------------------------------------------------- without torch


def test_safetensors_places_each_array(tmp_path):
  arrays = resnet_arrays()
  model, variables = load_pretrained(
    'resnet18', save_safetensors(arrays, tmp_path / 'w.safetensors')
  )
  assert model.num_classes == 3 and model.stem == 'imagenet' and model.width == 2
  params, stats = variables['params'], variables['batch_stats']
  backbone = params['backbone_net']
  np.testing.assert_array_equal(
    backbone['stem_conv']['kernel'], arrays['conv1.weight'].transpose(2, 3, 1, 0)
  )
  block = backbone['stage2_block1']
  np.testing.assert_array_equal(
    block['proj_conv']['kernel'], arrays['layer2.0.downsample.0.weight'].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(block['bn2']['scale'], arrays['layer2.0.bn2.weight'])
  np.testing.assert_array_equal(block['proj_bn']['bias'], arrays['layer2.0.downsample.1.bias'])
  np.testing.assert_array_equal(
    stats['backbone_net']['stage2_block1']['proj_bn']['var'],
    arrays['layer2.0.downsample.1.running_var'],
  )
  np.testing.assert_array_equal(
    stats['backbone_net']['stem_bn']['mean'], arrays['bn1.running_mean']
  )
  np.testing.assert_array_equal(params['head_net']['dense']['kernel'], arrays['fc.weight'].T)
  np.testing.assert_array_equal(params['head_net']['dense']['bias'], arrays['fc.bias'])
  used = len([k for k in arrays if not k.endswith('num_batches_tracked')])
  assert len(jax.tree.leaves(variables)) == used


def test_other_num_classes_starts_a_fresh_classifier(tmp_path):
  arrays = resnet_arrays()
  path = save_safetensors(arrays, tmp_path / 'w.safetensors')
  model, variables = load_pretrained('resnet18', path, num_classes=5)
  assert model.num_classes == 5
  assert variables['params']['head_net']['dense']['kernel'].shape == (16, 5)
  np.testing.assert_array_equal(
    variables['params']['backbone_net']['stem_conv']['kernel'],
    arrays['conv1.weight'].transpose(2, 3, 1, 0),
  )


@pytest.mark.parametrize(
  'change,message',
  [
    (
      lambda a: a.pop('layer3.1.bn2.running_mean'),
      r"'layer3.1.bn2.running_mean' is missing "
      r'\(expected shape \(8,\)\)',
    ),
    (
      lambda a: a.update(extra=np.zeros((2, 3), np.float32)),
      r"unexpected key 'extra' of "
      r'shape \(2, 3\)',
    ),
    (
      lambda a: a.update({'layer1.0.conv2.weight': np.zeros((2, 2, 1, 3), np.float32)}),
      r"'layer1.0.conv2.weight' has shape \(2, 2, 1, 3\), expected \(2, 2, 3, 3\)",
    ),
  ],
  ids=['missing', 'extra', 'misshapen'],
)
def test_keys_that_do_not_fit_are_named(change, message, tmp_path):
  arrays = resnet_arrays()
  change(arrays)
  path = save_safetensors(arrays, tmp_path / 'w.safetensors')
  with pytest.raises(WeightsError, match=message) as info:
    load_pretrained('resnet18', path)
  assert '\n' not in str(info.value) and "resnet18(stem='imagenet')" in str(info.value)


def test_other_depth_is_named(tmp_path):
  path = save_safetensors(resnet_arrays(), tmp_path / 'w.safetensors')
  with pytest.raises(WeightsError, match=r"'layer1\.2\.bn1\.bias' is missing .*more"):
    load_pretrained('resnet34', path)


def test_unreadable_files(tmp_path):
  with pytest.raises(WeightsError, match='no such file'):
    load_pretrained('resnet18', str(tmp_path / 'absent.pth'))
  (tmp_path / 'w.npz').write_bytes(b'')
  with pytest.raises(WeightsError, match=r'\.pth, \.pt or \.safetensors'):
    load_pretrained('resnet18', str(tmp_path / 'w.npz'))
  with pytest.raises(WeightsError, match='no pretrained weights layout.*resnet50'):
    load_pretrained('simple_cnn', str(tmp_path / 'w.npz'))


def test_pth_without_torch_says_what_to_install(tmp_path, monkeypatch):
  (tmp_path / 'w.pth').write_bytes(b'')
  monkeypatch.setitem(__import__('sys').modules, 'torch', None)
  with pytest.raises(WeightsError, match='pip install torch.*safetensors'):
    load_pretrained('resnet18', str(tmp_path / 'w.pth'))


# ---------------------------------------------------------------- bcam-weights convert


def _convert(*args):
  """`bcam-weights convert ...` as the program runs it (flags parsed, user errors as
  `error: ...`)."""
  with flagsaver.flagsaver():
    cli.run_main(weights_command.main, flags.FLAGS(['bcam-weights', *args]))


def test_convert_command_writes_a_checkpoint_that_loads(tmp_path, capsys):
  source = save_safetensors(resnet_arrays(), tmp_path / 'w.safetensors')
  out = str(tmp_path / 'converted')
  _convert('convert', 'resnet18', source, out)
  assert 'resnet18: 3 classes, 32x32x3 images' in capsys.readouterr().out
  with open(os.path.join(out, pretrained.MODEL_JSON)) as f:
    info = json.load(f)
  assert info['name'] == 'resnet18' and info['num_classes'] == 3
  model, variables = pretrained.load_converted(out)
  _, want = load_pretrained('resnet18', source)
  jax.tree.map(np.testing.assert_array_equal, variables, want)
  x = jnp.ones((1, 32, 32, 3))
  np.testing.assert_array_equal(model.apply(variables, x)[0], model.apply(want, x)[0])
  assert sorted(os.listdir(tmp_path)) == ['converted', 'w.safetensors']


def test_convert_command_errors_are_one_line(tmp_path):
  source = save_safetensors(resnet_arrays(), tmp_path / 'w.safetensors')
  out = str(tmp_path / 'out')
  with pytest.raises(SystemExit) as info:
    _convert('convert', 'resnet34', source, out)
  assert str(info.value.code).startswith('error: ') and '\n' not in str(info.value.code)
  assert not os.path.exists(out)
  _convert('--num_classes=4', 'convert', 'resnet18', source, out)
  with open(os.path.join(out, pretrained.MODEL_JSON)) as f:
    assert json.load(f)['num_classes'] == 4
  with pytest.raises(SystemExit, match='^error: .*exists'):
    _convert('convert', 'resnet18', source, out)
