"""Explaining any model: a user's linen CNN, an NNX model, our ResNet18 by module path, a
pair of pure functions and a ViT-style token model, against hand-written splits of the same
networks evaluated one image at a time."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from flax import nnx

from bcam_jax import cam, explain, parallel
from bcam_jax.models import get_model, init_variables

N, C, S = 4, 3, 8
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
METHODS = (
  'grad_cam',
  'grad_cam_pp',
  'xgrad_cam',
  'hires_cam',
  'layer_cam',
  'eigen_cam',
  'ablation_cam',
  'score_cam',
)


class UserCNN(nn.Module):
  """A user's own classifier: conv -> BatchNorm -> ReLU -> conv -> ReLU -> GAP -> dense,
  with `features` (up to conv_b's output, the explained layer: the ReLU applied as a
  function after it belongs to the rest) and `head` written out, so the test has a split
  that uses no interception."""

  def setup(self):
    self.conv_a = nn.Conv(4, (3, 3))
    self.norm = nn.BatchNorm(use_running_average=True)
    self.conv_b = nn.Conv(5, (3, 3))
    self.dense = nn.Dense(C)

  def features(self, x):
    return self.conv_b(nn.relu(self.norm(self.conv_a(x))))

  def head(self, a):
    return self.dense(nn.relu(a).mean((1, 2)))

  def __call__(self, x):
    return self.head(self.features(x))


class UserNNX(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.blocks = nnx.List([nnx.Conv(4, 4, (3, 3), rngs=rngs), nnx.Conv(4, 5, (3, 3), rngs=rngs)])
    self.head = nnx.Linear(5, C, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    for block in self.blocks:
      x = nnx.relu(block(x))
    return self.head(x.mean((1, 2)))


def _pixels(n=N, channels=3, seed=1):
  return jax.random.uniform(jax.random.key(seed), (n, S, S, channels))


def _targets(n=N):
  return jnp.arange(n) % C


def _normalise(pixels, mean=MEAN, std=STD):
  return (pixels - jnp.asarray(mean)) / jnp.asarray(std)


def _reference(method, features_fn, head_fn, pixels, targets, mean=MEAN, std=STD):
  """`method` one image at a time on a hand-written split: features_fn(x), head_fn(a)."""
  out = []
  for i in range(pixels.shape[0]):
    p, t = pixels[i : i + 1], targets[i : i + 1]
    a = features_fn(_normalise(p, mean, std))
    if method == 'eigen_cam':
      raw = cam.eigen_cam(a)
    elif method == 'score_cam':
      logits_fn = lambda q: head_fn(features_fn(_normalise(q, mean, std)))
      raw = cam.score_cam(logits_fn, p, a, t)
    else:
      raw = getattr(cam, method)(head_fn, a, t)
    out.append(cam.normalize_cam(cam.upsample_cam(raw, S))[0])
  return np.stack(out)


@pytest.fixture(scope='module')
def user_linen():
  net = UserCNN()
  variables = net.init(jax.random.key(0), _pixels())
  variables['batch_stats'] = jax.tree.map(lambda s: s + 0.3, variables['batch_stats'])
  return net, variables


@pytest.mark.parametrize('method', METHODS)
def test_linen_module_by_path_equals_hand_split_per_image(user_linen, method):
  net, variables = user_linen
  explainer = explain.Explainer(net, MEAN, STD, layer='conv_b')
  got = jax.jit(explainer.maps, static_argnums=0)(method, variables, _pixels(), _targets())
  features_fn = lambda x: net.apply(variables, x, method='features')
  head_fn = lambda a: net.apply(variables, a, method='head')
  want = _reference(method, features_fn, head_fn, _pixels(), _targets())
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
  assert float(got.max()) > 0.5


@pytest.mark.parametrize('method', METHODS)
def test_nnx_module_by_attribute_path_equals_hand_split_per_image(method):
  model = UserNNX(nnx.Rngs(0))
  explainer = explain.Explainer(model, MEAN, STD, layer='blocks.1')
  state = explainer.default_variables
  got = jax.jit(explainer.maps, static_argnums=0)(method, state, _pixels(), _targets())

  def features_fn(x):
    x = nnx.relu(model.stem(x))
    return model.blocks[1](nnx.relu(model.blocks[0](x)))  # blocks.1's output, before its ReLU

  head_fn = lambda a: model.head(nnx.relu(a).mean((1, 2)))
  want = _reference(method, features_fn, head_fn, _pixels(), _targets())
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
  # The user's module is unchanged: its own call still gives the same logits.
  np.testing.assert_allclose(
    model(_normalise(_pixels())), explainer.logits(None, _pixels()), rtol=1e-6
  )


@pytest.fixture(scope='module')
def tiny_resnet():
  model = get_model('resnet18', C, width=2)
  variables = init_variables(model, jax.random.key(0), S)
  variables['batch_stats'] = jax.tree.map(lambda s: s + 0.3, variables['batch_stats'])
  return model, variables


def test_resnet_module_path_equals_its_named_stage_and_a_per_image_loop(tiny_resnet):
  """stage3 (through Flax perturbations) is the output of block stage3_block2 (through
  interception): two independent routes, for every method; and the module path equals the
  model one image at a time for the three ways a method uses the rest of the network
  (its gradient, N * k feature sets through it, masked images through the whole model)."""
  model, variables = tiny_resnet
  pixels = _pixels(channels=1)
  by_path = explain.Explainer(model, 0.5, 0.25, layer='backbone_net/stage3_block2')
  by_stage = explain.Explainer(model, 0.5, 0.25, layer='stage3')
  maps = jax.jit(
    lambda e, p, t, methods: {m: e.maps(m, variables, p, t) for m in methods}, static_argnums=(0, 3)
  )
  got = maps(by_path, pixels, _targets(), METHODS)
  numerics_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
  jax.tree.map(numerics_close, got, maps(by_stage, pixels, _targets(), METHODS))
  some = ('grad_cam', 'ablation_cam', 'score_cam')
  single = [maps(by_path, pixels[i : i + 1], _targets()[i : i + 1], some) for i in range(N)]
  for method in some:
    numerics_close(got[method], np.concatenate([s[method] for s in single]))


def test_functions_model_equals_linen_module(user_linen):
  net, variables = user_linen
  functions = explain.FunctionsModel(
    lambda v, x: net.apply(v, x, method='features'), lambda v, a: net.apply(v, a, method='head')
  )
  by_functions = explain.Explainer(functions, MEAN, STD)
  by_path = explain.Explainer(net, MEAN, STD, layer='conv_b')
  for method in ('grad_cam', 'ablation_cam'):
    np.testing.assert_allclose(
      by_functions.maps(method, variables, _pixels(), _targets()),
      by_path.maps(method, variables, _pixels(), _targets()),
      rtol=1e-5,
      atol=1e-6,
    )


@pytest.mark.parametrize('kind', ['linen', 'nnx', 'resnet'])
def test_same_maps_on_one_and_eight_devices(kind, user_linen, tiny_resnet):
  if kind == 'linen':
    explainer, variables = (
      explain.Explainer(user_linen[0], MEAN, STD, layer='conv_b'),
      user_linen[1],
    )
    channels = 3
  elif kind == 'nnx':
    explainer = explain.Explainer(UserNNX(nnx.Rngs(0)), MEAN, STD, layer='blocks.0')
    variables, channels = explainer.default_variables, 3
  else:
    explainer = explain.Explainer(tiny_resnet[0], 0.5, 0.25, layer='backbone_net/stage2_block1')
    variables, channels = tiny_resnet[1], 1
  pixels, targets = _pixels(8, channels), _targets(8)
  maps = jax.jit(explainer.maps, static_argnums=0)
  methods = ('ablation_cam',) if kind == 'resnet' else ('grad_cam', 'ablation_cam', 'score_cam')
  for method in methods:
    results = []
    for n_dev in (1, 8):
      mesh = parallel.make_mesh(jax.devices()[:n_dev])
      xs, ts = parallel.shard_batch(mesh, np.asarray(pixels), np.asarray(targets))
      results.append(np.asarray(maps(method, variables, xs, ts)))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-4, atol=1e-5)


def test_unknown_layers_list_the_valid_paths(user_linen, tiny_resnet):
  net, variables = user_linen
  with pytest.raises(
    ValueError,
    match=r"layer 'conv_c' is not a layer of UserCNN; valid: "
    r'conv_a \(4, 8, 8, 4\), norm \(4, 8, 8, 4\), conv_b \(4, 8, 8, 5\)$',
  ):
    explain.Explainer(net, MEAN, STD, layer='conv_c').maps(
      'grad_cam', variables, _pixels(), _targets()
    )
  with pytest.raises(ValueError, match='name the layer of UserCNN to explain'):
    explain.Explainer(net, MEAN, STD).maps('grad_cam', variables, _pixels(), _targets())
  with pytest.raises(
    ValueError,
    match=r"layer 'blocks.2' is not a layer of UserNNX; valid: .*blocks.1 \(4, 8, 8, 5\)",
  ):
    explain.Explainer(UserNNX(nnx.Rngs(0)), layer='blocks.2').maps(
      'grad_cam', None, _pixels(), _targets()
    )
  model, resnet_vars = tiny_resnet
  with pytest.raises(
    ValueError,
    match=r"'backbone_net/stage9' is not a layer of .*nearest: .*backbone_net/stage4_block2.*more: "
    r'Explainer.layer_shapes lists them all',
  ):
    explain.Explainer(model, layer='backbone_net/stage9').maps(
      'grad_cam', resnet_vars, _pixels(channels=1), _targets()
    )
  assert 'backbone_net/stage4_block2/conv2' in explain.Explainer(model).layer_shapes(
    resnet_vars, _pixels(channels=1)
  )


def test_callable_targets(user_linen):
  net, variables = user_linen
  explainer = explain.Explainer(net, MEAN, STD, layer='conv_b')
  pixels = _pixels()
  features, _ = explainer.features(variables, pixels)
  head_fn = lambda a: net.apply(variables, a, method='head')
  by_index = explainer.raw_maps('grad_cam', variables, pixels, jnp.full(N, 2))
  by_logit = explainer.raw_maps('grad_cam', variables, pixels, lambda logits: logits[:, 2])
  np.testing.assert_allclose(by_logit, by_index, rtol=1e-6)
  probability = lambda logits: jax.nn.softmax(logits)[:, 1]
  got = explainer.raw_maps('grad_cam', variables, pixels, probability)
  for i in range(N):  # the gradient of one image's probability, by jax.grad
    g = jax.grad(lambda a: probability(head_fn(a[None]))[0])(features[i])
    want = jax.nn.relu(jnp.einsum('hwk,k->hw', features[i], g.mean((0, 1))))
    np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-7)
  assert explainer.targets(None, None, probability) is probability
  np.testing.assert_array_equal(explainer.targets(jnp.zeros((N, C)), None, 1), jnp.ones(N))
  with pytest.raises(ValueError, match="target='best'"):
    explainer.targets(jnp.zeros((N, C)), None, 'best')


def test_per_channel_normalisation_by_hand(user_linen):
  net, variables = user_linen
  explainer = explain.Explainer(net, MEAN, STD, layer='conv_b')
  pixels = _pixels()
  want = np.empty(pixels.shape, np.float32)
  for c in range(3):
    want[..., c] = (np.asarray(pixels[..., c]) - MEAN[c]) / STD[c]
  np.testing.assert_allclose(explainer.normalize(pixels), want, rtol=1e-6)
  np.testing.assert_allclose(
    explainer.logits(variables, pixels), net.apply(variables, want), rtol=1e-5
  )
  with pytest.raises(ValueError, match=r'mean=\(0.5, 0.5\) has 2 values for images of 3 channels'):
    explain.Explainer(net, (0.5, 0.5), 0.2, layer='conv_b').normalize(pixels)
  # Any channel count: a 5-channel image with one scalar normalisation.
  five = jax.random.uniform(jax.random.key(3), (2, S, S, 5))
  np.testing.assert_allclose(explain.Explainer(net, 0.5, 2.0).normalize(five), (five - 0.5) / 2)


class TinyViT(nn.Module):
  """Patch embedding, a class token, one token-mixing attention block, the class token's
  logits: the shape of a ViT."""

  @nn.compact
  def __call__(self, x):
    tokens = nn.Conv(6, (2, 2), strides=2, name='embed')(x)
    n, h, w, d = tokens.shape
    tokens = tokens.reshape(n, h * w, d)
    cls = self.param('cls', nn.initializers.normal(1.0), (1, 1, d))
    tokens = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)), tokens], axis=1)
    tokens = tokens + nn.MultiHeadDotProductAttention(num_heads=2, name='attention')(tokens)
    tokens = nn.Dense(d, name='block')(nn.gelu(tokens))
    return nn.Dense(C, name='logits')(tokens[:, 0])


def test_token_features_as_a_grid():
  """A ViT's block output (N, 1 + 16, D): the class token dropped, 4x4 patches; equal to
  the reshape written by hand (pytorch-grad-cam's reshape_transform)."""
  vit = TinyViT()
  pixels = _pixels()
  variables = vit.init(jax.random.key(0), pixels)
  explainer = explain.Explainer(vit, MEAN, STD, layer='attention')
  grid, grid_head = explainer.features(variables, pixels)
  tokens, token_head = explain.LinenModel(vit).features(variables, _normalise(pixels), 'attention')
  assert grid.shape == (N, 4, 4, 6)
  np.testing.assert_array_equal(grid, tokens[:, 1:].reshape(N, 4, 4, 6))
  np.testing.assert_allclose(grid_head(grid), token_head(tokens), rtol=1e-6)
  g_tokens = jax.grad(lambda t: token_head(t)[jnp.arange(N), _targets()].sum())(tokens)
  want = jax.nn.relu(
    jnp.einsum('nhwk,nk->nhw', grid, g_tokens[:, 1:].reshape(N, 4, 4, 6).mean((1, 2)))
  )
  np.testing.assert_allclose(
    explainer.raw_maps('grad_cam', variables, pixels, _targets()), want, rtol=1e-4, atol=1e-6
  )
  with pytest.raises(ValueError, match='17 patch tokens, not a square grid'):
    explain.token_grid(tokens, token_head, prefix_tokens=0)


def test_layer_fusion_is_the_mean_of_scaled_maps(user_linen):
  net, variables = user_linen
  fused = explain.Explainer(net, MEAN, STD, layer=('conv_a', 'conv_b'))
  parts = [explain.Explainer(net, MEAN, STD, layer=name) for name in ('conv_a', 'conv_b')]
  maps = [p.maps('layer_cam', variables, _pixels(), _targets()) for p in parts]
  np.testing.assert_allclose(
    fused.maps('layer_cam', variables, _pixels(), _targets()),
    cam.normalize_cam((maps[0] + maps[1]) / 2),
    rtol=1e-5,
    atol=1e-6,
  )


def test_smoothing_by_noise_and_augmentation_equals_a_loop(user_linen):
  net, variables = user_linen
  pixels, key = _pixels(), jax.random.key(7)
  plain = explain.Explainer(net, MEAN, STD, layer='conv_b')
  noisy = explain.Explainer(net, MEAN, STD, layer='conv_b', noise_samples=3, noise_std=0.1)
  noise = 0.1 * jax.random.normal(key, (3 * N,) + pixels.shape[1:])
  want = np.mean(
    [
      plain.maps('grad_cam', variables, pixels + noise[s * N : (s + 1) * N], _targets())
      for s in range(3)
    ],
    axis=0,
  )
  got = noisy.maps('grad_cam', variables, pixels, _targets(), key=key)
  np.testing.assert_allclose(got, cam.normalize_cam(want), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='noise_samples=3 needs a key'):
    noisy.maps('grad_cam', variables, pixels, _targets())

  augmented = explain.Explainer(net, MEAN, STD, layer='conv_b', augment=True)
  views = []
  for flip in (False, True):
    for factor in (0.9, 1.0, 1.1):
      view = (pixels[:, :, ::-1] if flip else pixels) * factor
      maps = plain.maps('grad_cam', variables, view, _targets())
      views.append(maps[:, :, ::-1] if flip else maps)
  np.testing.assert_allclose(
    augmented.maps('grad_cam', variables, pixels, _targets()),
    cam.normalize_cam(np.mean(views, axis=0)),
    rtol=1e-4,
    atol=1e-5,
  )


def test_our_model_with_the_variables_of_init_explains_any_batch():
  """`model.init` also returns a zero `perturbations` collection sized to its batch; the
  explainer ignores it (Score-CAM used to fail on it with incompatible shapes)."""
  model = get_model('simple_cnn', C)
  variables = model.init(jax.random.key(0), jnp.zeros((2, S, S, 1)))
  assert 'perturbations' in variables
  explainer = explain.Explainer(model, 0.5, 0.25, layer='stage1')
  for method in ('score_cam', 'ablation_cam', 'grad_cam'):
    assert explainer.maps(method, variables, _pixels(channels=1), _targets()).shape == (N, S, S)


def test_overlay_blends_the_colormap_over_the_image():
  pixels = _pixels(2, 1)
  maps = jax.random.uniform(jax.random.key(4), (2, S, S))
  got = np.asarray(explain.show_cam_on_image(pixels, maps, image_weight=0.3))
  jet = matplotlib.colormaps['jet']
  for i, y, x in [(0, 0, 0), (1, 3, 5), (1, 7, 7)]:
    colour = np.asarray(jet(int(round(float(maps[i, y, x]) * 255)))[:3])
    np.testing.assert_allclose(
      got[i, y, x], 0.3 * float(pixels[i, y, x, 0]) + 0.7 * colour, rtol=1e-5
    )
  assert got.shape == (2, S, S, 3) and got.min() >= 0 and got.max() <= 1
  with pytest.raises(ValueError, match=r'images \(2, 8, 8, 1\) and maps \(2, 4, 4\)'):
    explain.show_cam_on_image(pixels, maps[:, :4, :4])
