"""FullGrad (explain.fullgrad): its gradients by the full-gradient completeness identity, its
maps per image against the batch, against pytorch-grad-cam's FullGrad on a PyTorch twin
with BatchNorm (where torch is installed), and the models it refuses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bcam_jax import explain
from bcam_jax.explain import fullgrad
from bcam_jax.models import batch_norm

SIZE, CLASSES = 10, 4
TARGETS = jnp.array([0, 3, 1, 2])


class BnCnn(nn.Module):
  """Conv 3x3 8 ch (no bias), BatchNorm, ReLU, Conv 3x3 stride 2 6 ch (bias), our
  custom-VJP BatchNorm, ReLU, GAP, Dense: piecewise linear, with the three kinds of bias
  layer FullGrad reads."""

  train: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), padding=1, use_bias=False, name='conv1')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not self.train, name='bn1')(x))
    x = nn.Conv(6, (3, 3), strides=2, padding=1, name='conv2')(x)
    x = nn.relu(batch_norm.CustomVjpBatchNorm(not self.train, name='bn2')(x))
    return nn.Dense(CLASSES, name='dense')(jnp.mean(x, axis=(1, 2)))


def _variables(rng):
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  positive = lambda *shape: jnp.asarray(rng.uniform(0.5, 2.0, size=shape), jnp.float32)
  return {
    'params': {
      'conv1': {'kernel': normal(3, 3, 3, 8) / 5},
      'bn1': {'scale': positive(8), 'bias': 0.3 * normal(8)},
      'conv2': {'kernel': normal(3, 3, 8, 6) / 8, 'bias': 0.2 * normal(6)},
      'bn2': {'scale': positive(6), 'bias': 0.3 * normal(6)},
      'dense': {'kernel': normal(6, CLASSES) / 2, 'bias': normal(CLASSES)},
    },
    'batch_stats': {
      'bn1': {'mean': 0.2 * normal(8), 'var': positive(8)},
      'bn2': {'mean': 0.2 * normal(6), 'var': positive(6)},
    },
  }


@pytest.fixture(scope='module')
def problem():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=(4, SIZE, SIZE, 3)), jnp.float32)
  return BnCnn(), _variables(rng), images


def test_full_gradients_complete_the_score(problem):
  """Srinivas & Fleuret's completeness: for a piecewise-linear network, the target logit is
  dS/dx . x plus every bias times the gradient at its layer's output (the dense layer's
  bias times 1). It holds only if every 2-D bias layer is found, with BatchNorm's bias
  beta - mean gamma / sqrt(var + eps), and each gradient is that layer's."""
  model, variables, images = problem
  logits_fn = lambda x: model.apply(variables, x)
  input_grads, layers = fullgrad.full_gradients(logits_fn, images, TARGETS)
  assert [g.shape for _, g in layers] == [(4, 10, 10, 8), (4, 5, 5, 6), (4, 5, 5, 6)]
  parts = jnp.sum(input_grads * images, axis=(1, 2, 3))
  for bias, grads in layers:
    parts = parts + jnp.sum(bias * grads, axis=(1, 2, 3))
  parts = parts + variables['params']['dense']['bias'][TARGETS]
  logits = logits_fn(images)[jnp.arange(4), TARGETS]
  np.testing.assert_allclose(parts, logits, rtol=1e-5, atol=1e-5)


def _naive_map(model, variables, image, target):
  """One image's FullGrad map from per-layer numpy loops: each channel of each part
  min-max scaled, the layers' sums upsampled, all summed."""
  grads, layers = fullgrad.full_gradients(
    lambda x: model.apply(variables, x), image[None], jnp.array([target])
  )

  def scaled_sum(part):
    total = np.zeros(part.shape[:2])
    for c in range(part.shape[-1]):
      channel = part[..., c] - part[..., c].min()
      total += channel / (1e-7 + channel.max())
    return total

  total = scaled_sum(np.abs(np.asarray(grads[0] * image)))
  for bias, g in layers:
    layer = scaled_sum(np.abs(np.asarray(bias) * np.asarray(g[0])))
    total += np.asarray(jax.image.resize(jnp.asarray(layer), (SIZE, SIZE), 'bilinear'))
  return total


def test_maps_equal_a_per_image_loop(problem):
  model, variables, images = problem
  explainer = explain.Explainer(model)
  ours = explainer.raw_maps('full_grad', variables, images, TARGETS)
  for i in range(4):
    naive = _naive_map(model, variables, explainer.normalize(images)[i], int(TARGETS[i]))
    np.testing.assert_allclose(ours[i], naive, rtol=1e-5, atol=1e-5)
  scaled = explainer.maps('full_grad', variables, images, TARGETS)
  assert scaled.shape == (4, SIZE, SIZE) and float(scaled.max()) == pytest.approx(1.0)


def test_refuses_what_it_cannot_read(problem):
  model, variables, images = problem
  with pytest.raises(ValueError, match='evaluation mode'):
    explain.Explainer(BnCnn(train=True)).maps('full_grad', variables, images, TARGETS)
  dense = nn.Sequential([lambda x: x.reshape(x.shape[0], -1), nn.Dense(CLASSES)])
  params = dense.init(jax.random.key(0), images)
  with pytest.raises(ValueError, match='no bias layer'):
    explain.Explainer(dense).maps('full_grad', params, images, TARGETS)
  linear = nnx.Linear(3, CLASSES, rngs=nnx.Rngs(0))
  net = lambda x: linear(jnp.mean(x, axis=(1, 2)))
  adapter, state = explain.NNXModel.split(nnx.Sequential(net))
  with pytest.raises(ValueError, match='needs a Flax linen model'):
    explain.check_applicable(adapter, state, ['full_grad'])


def test_equals_pytorch_grad_cam_with_batch_norm(problem, record_property):
  """pytorch-grad-cam's FullGrad on the PyTorch twin: it finds conv2 (the Conv2d with a
  bias) and both BatchNorm2d, as we find conv2, bn1 and bn2."""
  torch = pytest.importorskip('torch')
  pytorch_grad_cam = pytest.importorskip('pytorch_grad_cam')
  from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

  model, variables, images = problem
  params, stats = variables['params'], variables['batch_stats']
  tensor = lambda a: torch.tensor(np.asarray(a))
  conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
  conv2 = torch.nn.Conv2d(8, 6, 3, stride=2, padding=1)
  bn1, bn2, fc = torch.nn.BatchNorm2d(8), torch.nn.BatchNorm2d(6), torch.nn.Linear(6, CLASSES)
  with torch.no_grad():
    for conv, name in ((conv1, 'conv1'), (conv2, 'conv2')):
      conv.weight.copy_(tensor(np.asarray(params[name]['kernel']).transpose(3, 2, 0, 1)))
    conv2.bias.copy_(tensor(params['conv2']['bias']))
    for bn, name in ((bn1, 'bn1'), (bn2, 'bn2')):
      bn.weight.copy_(tensor(params[name]['scale']))
      bn.bias.copy_(tensor(params[name]['bias']))
      bn.running_mean.copy_(tensor(stats[name]['mean']))
      bn.running_var.copy_(tensor(stats[name]['var']))
    fc.weight.copy_(tensor(np.asarray(params['dense']['kernel']).T))
    fc.bias.copy_(tensor(params['dense']['bias']))
  features = torch.nn.Sequential(conv1, bn1, torch.nn.ReLU(), conv2, bn2, torch.nn.ReLU())
  twin = torch.nn.Sequential(features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), fc)
  twin = twin.eval()
  x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    np.testing.assert_allclose(twin(x).numpy(), model.apply(variables, images), atol=1e-5)
  targets = [ClassifierOutputTarget(int(c)) for c in TARGETS]
  with pytorch_grad_cam.FullGrad(twin, []) as method:
    theirs = method(input_tensor=x, targets=targets)
  ours = np.asarray(explain.Explainer(model).maps('full_grad', variables, images, TARGETS))
  difference = float(np.abs(ours - theirs).max())
  record_property('max_abs_difference', difference)
  print(f'FullGrad (BatchNorm): max abs difference {difference:.2e}')
  assert difference < 1e-5
