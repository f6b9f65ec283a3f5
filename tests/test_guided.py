"""Guided backpropagation and Guided Grad-CAM against a hand-written backward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcam_jax import cam, explain

SIDE, HIDDEN, CLASSES = 4, 7, 3


class Mlp(nn.Module):
  """Dense, ReLU, dense, ReLU, dense on the flattened pixels."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(HIDDEN, name='d1')(x.reshape(x.shape[0], -1)))
    h = nn.relu(nn.Dense(HIDDEN, name='d2')(h))
    return nn.Dense(CLASSES, name='d3')(h)


def naive_guided(params, x, target):
  """One image, in float64 numpy: the chain rule with each ReLU's backward kept only where
  its input and the incoming gradient are both positive."""
  w = {k: np.asarray(params[k]['kernel'], np.float64) for k in ('d1', 'd2', 'd3')}
  b = {k: np.asarray(params[k]['bias'], np.float64) for k in ('d1', 'd2', 'd3')}
  v = np.asarray(x, np.float64).reshape(-1)
  pre1 = v @ w['d1'] + b['d1']
  pre2 = np.maximum(pre1, 0) @ w['d2'] + b['d2']
  g = w['d3'][:, target]
  g = np.where((pre2 > 0) & (g > 0), g, 0) @ w['d2'].T
  g = np.where((pre1 > 0) & (g > 0), g, 0) @ w['d1'].T
  return g.reshape(x.shape)


@pytest.fixture(scope='module')
def mlp():
  net = Mlp()
  pixels = jax.random.uniform(jax.random.key(0), (5, SIDE, SIDE, 1))
  variables = net.init(jax.random.key(1), pixels)
  return explain.Explainer(net, mean=0.5, std=0.25, layer='d1'), variables, pixels


def test_guided_gradients_equal_the_hand_written_backward(mlp):
  explainer, variables, pixels = mlp
  targets = jnp.array([0, 2, 1, 1, 0])
  got = jax.jit(explainer.guided_gradients)(variables, pixels, targets)
  x = explainer.normalize(pixels)
  for i, t in enumerate(np.asarray(targets)):
    np.testing.assert_allclose(got[i], naive_guided(variables['params'], x[i], t), atol=1e-6)
  plain = jax.grad(lambda v: explainer.adapter.logits(variables, v)[0, 0])(x[:1])
  assert np.abs(plain - got[:1]).max() > 1e-3  # negative gradients were stopped
  assert jax.nn.relu is nn.relu  # the swap is undone


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name='conv')(x))
    return nn.Dense(CLASSES)(x.mean((1, 2)))


def test_methods_by_name():
  """guided_backprop's map is the largest |gradient| over the channels; guided_grad_cam
  multiplies it by the layer's Grad-CAM at image size."""
  conv = explain.Explainer(ConvNet(), mean=0.5, std=0.25, layer='conv')
  rgb = jax.random.uniform(jax.random.key(2), (3, 6, 6, 3))
  conv_vars = conv.model.init(jax.random.key(3), rgb)
  targets = jnp.array([0, 1, 2])
  gb = conv.raw_maps('guided_backprop', conv_vars, rgb, targets)
  grads = conv.guided_gradients(conv_vars, rgb, targets)
  np.testing.assert_allclose(gb, jnp.abs(grads).max(axis=-1), rtol=1e-6)
  features, head_fn = conv.features(conv_vars, rgb, 'conv')
  grad_cam = cam.normalize_cam(cam.upsample_cam(cam.grad_cam(head_fn, features, targets), 6))
  ggc = jax.jit(conv.raw_maps, static_argnums=0)('guided_grad_cam', conv_vars, rgb, targets)
  np.testing.assert_allclose(ggc, grad_cam * gb, rtol=1e-5, atol=1e-7)
  maps = conv.maps('guided_grad_cam', conv_vars, rgb, targets)
  assert maps.shape == (3, 6, 6) and float(maps.max()) > 0.99


class TanhNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(CLASSES)(jnp.tanh(nn.Dense(4)(x.reshape(x.shape[0], -1))))


def test_a_model_without_relu_is_refused():
  explainer = explain.Explainer(TanhNet(), layer='Dense_0')
  pixels = jnp.zeros((2, SIDE, SIDE, 1))
  variables = explainer.model.init(jax.random.key(0), pixels)
  with pytest.raises(ValueError, match='found no ReLU to guide'):
    explainer.guided_gradients(variables, pixels, jnp.array([0, 1]))
  assert jax.nn.relu is nn.relu
