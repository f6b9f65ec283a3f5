"""Tests of bcam_jax.models: sizes, parameter counts, per-sample head, train/eval behaviour, errors.

Big models are checked by shape inference (jax.eval_shape) wherever no
numbers are needed; real computation uses 28x28 images and tiny batches.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcam_jax.models import (
  MODEL_NAMES,
  cam_shape,
  get_model,
  head_fn,
  init_variables,
  model_options,
  param_count,
)
from bcam_jax.models.convnext import GRN, ConvNeXtBlock
from bcam_jax.models.resnet import BasicBlock

NUM_CLASSES = 10
# The models the size and behaviour tables below cover at full width. One member of each
# other family runs tiny in test_tiny_families; resnet34, resnet101 and vit_b16 differ from
# those only in depth or widths, and tests/test_pretrained.py checks their parameter counts.
TABLED_MODELS = ('simple_cnn', 'resnet18', 'convnext_v2_tiny')
TINY_FAMILIES = {
  'resnet50': {'width': 2},
  'convnext_tiny': {'width': 4},
  'vit_s16': {'patch_size': 4, 'hidden': 8, 'depth': 2, 'heads': 2, 'mlp_dim': 16},
}
COUNTED_ONLY = ('resnet34', 'resnet101', 'vit_b16')

# Documented feature sizes (h, w, k) per (model, options) and image side.
SIZES = {
  ('simple_cnn', ()): {
    28: {'stage1': (14, 14, 32), 'stage2': (7, 7, 64), 'cam': (7, 7, 64)},
    112: {'stage1': (56, 56, 32), 'stage2': (28, 28, 64), 'cam': (28, 28, 64)},
  },
  ('resnet18', ()): {
    28: {
      'stem': (28, 28, 64),
      'stage1': (28, 28, 64),
      'stage2': (14, 14, 128),
      'stage3': (7, 7, 256),
      'stage4': (4, 4, 512),
      'cam': (4, 4, 512),
    },
    112: {
      'stem': (112, 112, 64),
      'stage1': (112, 112, 64),
      'stage2': (56, 56, 128),
      'stage3': (28, 28, 256),
      'stage4': (14, 14, 512),
      'cam': (14, 14, 512),
    },
  },
  ('resnet18', (('stem', 'imagenet'),)): {
    28: {
      'stem': (7, 7, 64),
      'stage1': (7, 7, 64),
      'stage2': (4, 4, 128),
      'stage3': (2, 2, 256),
      'stage4': (1, 1, 512),
      'cam': (1, 1, 512),
    },
    112: {
      'stem': (28, 28, 64),
      'stage1': (28, 28, 64),
      'stage2': (14, 14, 128),
      'stage3': (7, 7, 256),
      'stage4': (4, 4, 512),
      'cam': (4, 4, 512),
    },
  },
  ('convnext_v2_tiny', ()): {
    28: {
      'stem': (28, 28, 96),
      'stage1': (28, 28, 96),
      'stage2': (14, 14, 192),
      'stage3': (7, 7, 384),
      'stage4': (3, 3, 768),
      'cam': (3, 3, 768),
    },
    112: {
      'stem': (112, 112, 96),
      'stage1': (112, 112, 96),
      'stage2': (56, 56, 192),
      'stage3': (28, 28, 384),
      'stage4': (14, 14, 768),
      'cam': (14, 14, 768),
    },
  },
  ('convnext_v2_tiny', (('stem_stride', 2),)): {
    28: {
      'stem': (14, 14, 96),
      'stage1': (14, 14, 96),
      'stage2': (7, 7, 192),
      'stage3': (3, 3, 384),
      'stage4': (1, 1, 768),
      'cam': (1, 1, 768),
    },
    112: {
      'stem': (56, 56, 96),
      'stage1': (56, 56, 96),
      'stage2': (28, 28, 192),
      'stage3': (14, 14, 384),
      'stage4': (7, 7, 768),
      'cam': (7, 7, 768),
    },
  },
  ('convnext_v2_tiny', (('stem_stride', 4),)): {
    112: {
      'stem': (28, 28, 96),
      'stage1': (28, 28, 96),
      'stage2': (14, 14, 192),
      'stage3': (7, 7, 384),
      'stage4': (3, 3, 768),
      'cam': (3, 3, 768),
    },
  },
}
SIZE_CASES = [(name, opts, side) for (name, opts), table in SIZES.items() for side in table]
CONFIGS = list(SIZES)


def _ids(case):
  return '-'.join(str(part) for part in jax.tree.leaves(case))


def _images(batch, side, channels=1):
  return jax.ShapeDtypeStruct((batch, side, side, channels), jnp.float32)


def _init_shapes(model, images):
  """Shapes of ((logits, features), variables) for ``images``, without computing anything."""

  def init(x):
    return model.init_with_output(jax.random.key(0), x, train=False)

  return jax.eval_shape(init, images)


@pytest.fixture(scope='module')
def variables():
  """Initial variables of each default model for 28x28 images, built once."""
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = init_variables(get_model(name, NUM_CLASSES), jax.random.key(0), 28)
    return cache[name]

  return get


def _random_images(batch, side=28, seed=1):
  return jax.random.uniform(jax.random.key(seed), (batch, side, side, 1))


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize('name,opts,side', SIZE_CASES, ids=_ids)
def test_output_and_feature_shapes(name, opts, side):
  model = get_model(name, NUM_CLASSES, **dict(opts))
  (logits, features), _ = _init_shapes(model, _images(2, side))
  assert logits.shape == (2, NUM_CLASSES) and logits.dtype == jnp.float32
  assert {k: v.shape[1:] for k, v in features.items()} == SIZES[name, opts][side]
  assert all(v.shape[0] == 2 for v in features.values())


@pytest.mark.parametrize('name,opts,side', SIZE_CASES, ids=_ids)
def test_cam_shape_helper(name, opts, side):
  model = get_model(name, NUM_CLASSES, **dict(opts))
  assert cam_shape(model, side) == SIZES[name, opts][side]['cam']
  assert model.cam_side(side) == SIZES[name, opts][side]['cam'][0]


@pytest.mark.parametrize('name', TABLED_MODELS)
def test_default_cam_at_least_3x3_at_28(name):
  h, w, _ = cam_shape(get_model(name, NUM_CLASSES), 28)
  assert h >= 3 and w >= 3


@pytest.mark.parametrize('name,opts', CONFIGS, ids=_ids)
def test_size_arithmetic_matches_layers(name, opts):
  """cam_side (used by the size check) agrees with the layers, at odd sides and the minimum."""
  model = get_model(name, NUM_CLASSES, **dict(opts))
  smallest = model.min_image_side()
  for side in sorted({smallest, smallest + 1, 33}):
    assert cam_shape(model, side)[:2] == (model.cam_side(side),) * 2
  assert model.cam_side(smallest) == 1
  if smallest > 1:
    with pytest.raises(ValueError):
      cam_shape(model, smallest - 1)


def test_minimum_image_sides():
  assert get_model('simple_cnn', 2).min_image_side() == 4
  assert get_model('resnet18', 2).min_image_side() == 1
  assert get_model('resnet18', 2, stem='imagenet').min_image_side() == 1
  assert [get_model('convnext_v2_tiny', 2, stem_stride=s).min_image_side() for s in (1, 2, 4)] == [
    8,
    15,
    32,
  ]


# ---------------------------------------------------------------- parameter counts


def _param_count(model, side, channels=1):
  _, variables = _init_shapes(model, _images(1, side, channels))
  return param_count(variables['params'])


def _simple_cnn_params(side, num_classes=NUM_CLASSES):
  """Hand count: three 3x3 convs with biases, Dense on the flattened (side // 4)^2 x 64 map."""
  convs = (9 * 1 + 1) * 32 + (9 * 32 + 1) * 64 + (9 * 64 + 1) * 64
  return convs + (side // 4) ** 2 * 64 * num_classes + num_classes


@pytest.mark.parametrize('side', [28, 30, 112])
def test_simple_cnn_param_count(side):
  assert _param_count(get_model('simple_cnn', NUM_CLASSES), side) == _simple_cnn_params(side)


def test_documented_simple_cnn_param_counts():
  assert (_simple_cnn_params(28), _simple_cnn_params(112)) == (87_114, 557_514)


TORCHVISION_RESNET18 = 11_689_512  # 1000 classes, RGB 7x7 stem.


def test_resnet18_param_count_from_torchvision():
  fc_1000, fc_10 = 512 * 1000 + 1000, 512 * 10 + 10
  stem_rgb_7x7, stem_gray_3x3, stem_gray_7x7 = 3 * 49 * 64, 9 * 64, 49 * 64
  small = TORCHVISION_RESNET18 - fc_1000 + fc_10 - stem_rgb_7x7 + stem_gray_3x3
  imagenet = TORCHVISION_RESNET18 - fc_1000 + fc_10 - stem_rgb_7x7 + stem_gray_7x7
  assert (small, imagenet) == (11_172_810, 11_175_370)
  for side in (28, 112):
    assert _param_count(get_model('resnet18', NUM_CLASSES), side) == small
    assert _param_count(get_model('resnet18', NUM_CLASSES, stem='imagenet'), side) == imagenet
  # The torchvision architecture itself: RGB input, 1000 classes.
  assert _param_count(get_model('resnet18', 1000, stem='imagenet'), 32, 3) == TORCHVISION_RESNET18


def _convnext_v2_tiny_params(in_channels, stem_kernel, num_classes):
  """Hand count: stem conv + LN, blocks, downsamples (LN + 2x2 conv), head LN + Dense."""
  dims, depths = (96, 192, 384, 768), (3, 3, 9, 3)
  # Block: dwconv 49d + d, LN 2d, Dense d->4d 4d^2 + 4d, GRN 8d, Dense 4d->d 4d^2 + d.
  blocks = sum(n * (8 * d * d + 65 * d) for n, d in zip(depths, dims))
  stem = stem_kernel**2 * in_channels * 96 + 96 + 2 * 96
  downsamples = sum(2 * a + 4 * a * b + b for a, b in zip(dims, dims[1:]))
  head = 2 * 768 + 768 * num_classes + num_classes
  return stem + blocks + downsamples + head


def test_convnext_v2_tiny_param_count():
  published = _convnext_v2_tiny_params(3, 4, 1000)
  assert round(published / 1e6, 1) == 28.6  # ConvNeXt V2-T: 28.6M parameters.
  assert _param_count(get_model('convnext_v2_tiny', 1000, stem_stride=4), 32, 3) == published
  small, patchify = _convnext_v2_tiny_params(1, 3, 10), _convnext_v2_tiny_params(1, 4, 10)
  assert (small, patchify) == (27_870_442, 27_871_114)
  for side in (28, 112):
    for stride in (1, 2):
      model = get_model('convnext_v2_tiny', NUM_CLASSES, stem_stride=stride)
      assert _param_count(model, side) == small
  assert _param_count(get_model('convnext_v2_tiny', NUM_CLASSES, stem_stride=4), 112) == patchify


# ---------------------------------------------------------------- per-sample head


@pytest.mark.parametrize('name', TABLED_MODELS)
def test_head_is_per_sample(name):
  model = get_model(name, NUM_CLASSES)
  cam = jax.random.normal(jax.random.key(2), (3,) + cam_shape(model, 28))
  # Random values for every head parameter (LayerNorm scale and bias included), so nothing is
  # trivial; the head's own variables only (it needs no batch_stats).
  shapes = jax.eval_shape(lambda c: model.init(jax.random.key(0), c, method='head'), cam)
  rng = np.random.default_rng(3)
  head_vars = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), shapes)

  @jax.jit
  def head(c):
    return model.apply(head_vars, c, method='head')

  logits = head(cam)
  assert logits.shape == (3, NUM_CLASSES) and logits.dtype == jnp.float32
  jacobian = np.asarray(jax.jit(jax.jacrev(head))(cam))  # (3, C, 3, h, w, k)
  for i in range(3):
    for j in range(3):
      block = jacobian[i, :, j]
      if i == j:
        assert np.abs(block).max() > 0
      else:
        assert np.all(block == 0), (i, j)
  alone = jnp.concatenate([head(cam[i : i + 1]) for i in range(3)])
  np.testing.assert_allclose(logits, alone, rtol=1e-5, atol=1e-6 * np.abs(logits).max())


# ---------------------------------------------------------------- entry points, train/eval


@pytest.mark.parametrize('name', TABLED_MODELS)
def test_apply_is_head_of_backbone(name, variables):
  model, v, x = get_model(name, NUM_CLASSES), variables(name), _random_images(2)

  @jax.jit  # One compilation for both paths; the entry points are still traced separately.
  def both_ways(v, x):
    logits, features = model.apply(v, x)
    features_b = model.apply(v, x, method='backbone')
    return logits, features, model.apply(v, features_b['cam'], method='head'), features_b

  logits, features, logits_b, features_b = both_ways(v, x)
  assert logits.shape == (2, NUM_CLASSES) and np.all(np.isfinite(logits))
  np.testing.assert_allclose(logits, logits_b, rtol=1e-5, atol=1e-5)
  assert set(features) == set(features_b)
  for key in features:
    np.testing.assert_allclose(features[key], features_b[key], rtol=1e-5, atol=1e-5)
  expected_collections = {'params', 'batch_stats'} if name == 'resnet18' else {'params'}
  assert set(v) == expected_collections


def test_resnet18_train_updates_batch_stats(variables):
  model, v, x = get_model('resnet18', NUM_CLASSES), variables('resnet18'), _random_images(2)

  @jax.jit
  def train_apply(v, x):
    return model.apply(v, x, train=True, mutable=['batch_stats'])

  @jax.jit
  def train_backbone(v, x):
    return model.apply(v, x, train=True, method='backbone', mutable=['batch_stats'])

  (logits, _), updates = train_apply(v, x)
  features, updates_b = train_backbone(v, x)
  np.testing.assert_allclose(
    logits, model.apply(v, features['cam'], method='head'), rtol=1e-5, atol=1e-5
  )
  same = jax.tree.map(
    lambda a, b: np.allclose(a, b, rtol=1e-5, atol=1e-6),
    updates['batch_stats'],
    updates_b['batch_stats'],
  )
  assert all(jax.tree.leaves(same))
  # Momentum 0.9: the running mean moves 10% of the way from 0 to the batch mean.
  stem = v['params']['backbone_net']['stem_conv']['kernel']
  conv = jax.lax.conv_general_dilated(
    x, stem, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  new_mean = updates['batch_stats']['backbone_net']['stem_bn']['mean']
  np.testing.assert_allclose(new_mean, 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  changed = jax.tree.map(
    lambda a, b: bool(np.any(a != b)), v['batch_stats'], updates['batch_stats']
  )
  assert all(jax.tree.leaves(changed))


def test_resnet18_batch_stats_global_over_sharded_batch(variables):
  """BatchNorm has no axis_name: jit over a batch sharded on 8 devices uses the global batch."""
  model, v = get_model('resnet18', NUM_CLASSES), variables('resnet18')
  x = _random_images(8)
  mesh = jax.make_mesh((8,), ('batch',))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  sharded = jax.device_put(x, batch_sharding)
  train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[1])
  expected = train(v, x)
  got = train(v, sharded)
  assert all(
    jax.tree.leaves(
      jax.tree.map(lambda a, b: np.allclose(a, b, rtol=1e-4, atol=1e-5), expected, got)
    )
  )


def test_convnext_drop_path_only_in_train(variables):
  v, x = variables('convnext_v2_tiny'), _random_images(4)

  def runner(model, train):
    apply = jax.jit(lambda v, key: model.apply(v, x, train=train, rngs={'dropout': key})[0])
    return lambda seed: apply(v, jax.random.key(seed))

  dropping = get_model('convnext_v2_tiny', NUM_CLASSES, drop_path_rate=0.5)
  train, evaluate = runner(dropping, True), runner(dropping, False)
  np.testing.assert_array_equal(train(0), train(0))
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(evaluate(0), evaluate(1))
  # Without drop path, training and evaluation compute the same thing (no BatchNorm here).
  no_drop = get_model('convnext_v2_tiny', NUM_CLASSES, drop_path_rate=0.0)
  np.testing.assert_allclose(runner(no_drop, True)(0), evaluate(0), rtol=1e-5, atol=1e-5)


def test_convnext_drop_path_rates_linear():
  model = get_model('convnext_v2_tiny', NUM_CLASSES, drop_path_rate=0.2)
  rates = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, ConvNeXtBlock) and context.method_name == '__call__':
      rates.append(context.module.drop_path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _init_shapes(model, _images(1, 28))
  np.testing.assert_allclose(rates, np.linspace(0.0, 0.2, 18))


def test_drop_path_is_per_sample_and_rescaled():
  block = ConvNeXtBlock(dim=8, drop_path=0.5, dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(0), (64, 2, 2, 8))
  params = jax.jit(lambda key: block.init(key, x, train=False))(jax.random.key(1))
  # Perturb the zero-initialised GRN so the branch is not trivially shaped.
  params = jax.tree.map(lambda p: p + 0.1, params)

  @jax.jit
  def branches(params, x):
    train = block.apply(params, x, train=True, rngs={'dropout': jax.random.key(2)})
    return block.apply(params, x, train=False) - x, train - x

  branch, train_branch = branches(params, x)
  dropped = np.all(np.asarray(train_branch) == 0, axis=(1, 2, 3))
  kept = ~dropped
  np.testing.assert_allclose(train_branch[kept], 2 * branch[kept], rtol=1e-5, atol=1e-6)
  assert 10 < dropped.sum() < 54


def test_grn_matches_formula():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5)).at[0, :, :, 1].set(0.0)
  grn = GRN(dtype=jnp.float32)
  apply = jax.jit(grn.apply)
  params = jax.jit(grn.init)(jax.random.key(1), x)
  assert params['params']['gamma'].shape == (1, 1, 1, 5)
  np.testing.assert_array_equal(apply(params, x), x)  # gamma = beta = 0: identity.
  gamma = jax.random.normal(jax.random.key(2), (1, 1, 1, 5))
  beta = jax.random.normal(jax.random.key(3), (1, 1, 1, 5))
  params = {'params': {'gamma': gamma, 'beta': beta}}
  xn = np.asarray(x, np.float64)
  gx = np.sqrt((xn**2).sum(axis=(1, 2), keepdims=True))
  nx = gx / (gx.mean(axis=-1, keepdims=True) + 1e-6)
  expected = np.asarray(gamma) * (xn * nx) + np.asarray(beta) + xn
  np.testing.assert_allclose(apply(params, x), expected, rtol=1e-5, atol=1e-6)
  grad = jax.jit(jax.grad(lambda x: apply(params, x).sum()))(x)
  assert np.all(np.isfinite(grad))  # An all-zero channel gives no NaN.


# ---------------------------------------------------------------- errors and options


def test_every_model_is_tabled_or_tiny():
  assert sorted(TABLED_MODELS + tuple(TINY_FAMILIES) + COUNTED_ONLY) == sorted(MODEL_NAMES)


@pytest.mark.parametrize('name', TINY_FAMILIES)
def test_tiny_families(name):
  """Each head and pooling runs; the logits are the head (``head_fn``) of the backbone's
  CAM map."""
  x = _random_images(3)
  for head, pool in (('default', 'default'), ('softcam', 'default'), ('default', 'ca_stream')):
    model = get_model(name, NUM_CLASSES, head=head, pooling=pool, **TINY_FAMILIES[name])
    v = init_variables(model, jax.random.key(0), 28)

    @jax.jit
    def run(v, x, model=model):
      logits, features = model.apply(v, x)
      return logits, head_fn(model, v, features)(features['cam'])

    logits, from_head = run(v, x)
    assert logits.shape == (3, NUM_CLASSES) and np.all(np.isfinite(logits))
    np.testing.assert_allclose(from_head, logits, rtol=1e-5, atol=1e-5)


def test_vit_head_needs_the_class_token():
  model = get_model('vit_s16', NUM_CLASSES, **TINY_FAMILIES['vit_s16'])
  v = init_variables(model, jax.random.key(0), 28)
  features = model.apply(v, _random_images(1), method='backbone')
  assert features['cam'].shape == (1, 7, 7, 8) and features['class_token'].shape == (1, 8)
  with pytest.raises(ValueError, match='class_token.*head_fn'):
    model.apply(v, features['cam'], method='head')
  with pytest.raises(ValueError, match=r'7x7 patch grid \(28x28 images\), got a 8x8'):
    model.apply(v, _random_images(1, side=32))


def test_get_model_unknown_name():
  with pytest.raises(ValueError, match='unknown model') as info:
    get_model('vgg16', NUM_CLASSES)
  assert all(name in str(info.value) for name in MODEL_NAMES)


def test_get_model_unknown_option():
  with pytest.raises(ValueError, match='stem_stride') as info:
    get_model('resnet18', NUM_CLASSES, stem_stride=2)
  assert all(option in str(info.value) for option in model_options('resnet18'))
  assert model_options('resnet18') == (
    'dtype',
    'stem',
    'width',
    'zero_init_residual',
    'batch_norm',
  )
  assert model_options('convnext_v2_tiny') == ('dtype', 'stem_stride', 'drop_path_rate')
  assert model_options('simple_cnn') == ('dtype',)


def test_invalid_option_values():
  with pytest.raises(ValueError, match='stem'):
    get_model('resnet18', NUM_CLASSES, stem='huge')
  with pytest.raises(ValueError, match='stem_stride'):
    get_model('convnext_v2_tiny', NUM_CLASSES, stem_stride=3)
  with pytest.raises(ValueError, match='drop_path_rate'):
    get_model('convnext_v2_tiny', NUM_CLASSES, drop_path_rate=1.0)
  with pytest.raises(ValueError, match='num_classes'):
    get_model('simple_cnn', 0)


def test_too_small_image_size():
  simple = get_model('simple_cnn', NUM_CLASSES)
  with pytest.raises(ValueError, match=r'simple_cnn.*3x3'):
    cam_shape(simple, 3)
  with pytest.raises(ValueError, match=r'simple_cnn.*3x3'):
    init_variables(simple, jax.random.key(0), 3)
  with pytest.raises(ValueError, match=r'simple_cnn.*28x3'):
    _init_shapes(simple, jax.ShapeDtypeStruct((1, 28, 3, 1), jnp.float32))
  patchify = get_model('convnext_v2_tiny', NUM_CLASSES, stem_stride=4)
  with pytest.raises(ValueError, match=r'convnext_v2_tiny.*28x28.*32x32'):
    cam_shape(patchify, 28)
  _, v = _init_shapes(patchify, _images(1, 32))
  with pytest.raises(ValueError, match=r'convnext_v2_tiny.*28x28'):
    jax.eval_shape(lambda v, x: patchify.apply(v, x, method='backbone'), v, _images(1, 28))


def test_zero_init_residual():
  """The option reaches every block, and there zeroes the last BatchNorm scale only."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, BasicBlock) and context.method_name == '__call__':
      seen.append(context.module.zero_init_residual)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _init_shapes(get_model('resnet18', NUM_CLASSES, zero_init_residual=True), _images(1, 8))
  assert seen == [True] * 8
  block = BasicBlock(features=4, stride=2, zero_init_residual=True, dtype=jnp.float32)
  x = jnp.ones((1, 4, 4, 2))
  params = jax.jit(lambda key: block.init(key, x, train=False))(jax.random.key(0))['params']
  assert np.all(params['bn2']['scale'] == 0)
  assert np.all(params['bn1']['scale'] == 1) and np.all(params['proj_bn']['scale'] == 1)


# ---------------------------------------------------------------- bfloat16


@pytest.mark.parametrize('name', TABLED_MODELS)
def test_bfloat16_shapes(name):
  model = get_model(name, NUM_CLASSES, dtype='bfloat16')
  (logits, features), v = _init_shapes(model, _images(2, 28))
  assert logits.dtype == jnp.float32
  assert features['cam'].dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v['params']))


@pytest.mark.parametrize('name', ['simple_cnn', 'resnet18'])
def test_bfloat16_runs_close_to_float32(name, variables):
  v, x = variables(name), _random_images(2)
  logits16, _ = jax.jit(get_model(name, NUM_CLASSES, dtype=jnp.bfloat16).apply)(v, x)
  logits32, _ = jax.jit(get_model(name, NUM_CLASSES).apply)(v, x)
  assert logits16.dtype == jnp.float32
  scale = float(np.abs(logits32).max())
  np.testing.assert_allclose(logits16, logits32, atol=0.05 * scale)
