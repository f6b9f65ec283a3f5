"""CAM, Grad-CAM++, Score-CAM and explained layers against per-image, per-channel loops."""

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcam_jax import cam, explain
from bcam_jax.models import get_model, init_variables
from tests.test_cam import HEADS, C, N, _head_fn


def _targets():
  return jnp.array([0, 3, 1, 1, 2, 0])


def test_cam_equals_grad_cam_times_area_for_gap_dense_head():
  """For GAP + dense, Grad-CAM's weights are W[:, t] / (h w) at every position."""
  _, features = _head_fn('gap_dense')
  head = HEADS['gap_dense'](num_classes=C)
  params = head.init(jax.random.key(1), features)
  head_fn = lambda a: head.apply(params, a)
  got = jax.jit(cam.cam)(features, params['params']['dense']['kernel'], _targets())
  h, w = features.shape[1:3]
  np.testing.assert_allclose(
    got, h * w * cam.grad_cam(head_fn, features, _targets()), rtol=1e-5, atol=1e-5
  )
  assert got.shape == (N, h, w) and (got >= 0).all() and got.max() > 0


def naive_grad_cam_pp(head_fn, features, targets, eps=1e-6):
  """Per image, per channel, per position, in numpy, from jax.grad of one logit."""
  maps = []
  for i in range(features.shape[0]):
    a = np.asarray(features[i], np.float64)
    g = np.asarray(jax.grad(lambda x: head_fn(x[None])[0, targets[i]])(features[i]), np.float64)
    h, w, k = a.shape
    weights = np.zeros(k)
    for c in range(k):
      total = a[:, :, c].sum()
      for y in range(h):
        for x in range(w):
          gv = g[y, x, c]
          if gv != 0:
            alpha = gv**2 / (2 * gv**2 + total * gv**3 + eps)
            weights[c] += alpha * max(gv, 0.0)
    maps.append(np.maximum(np.einsum('hwk,k->hw', a, weights), 0))
  return np.stack(maps)


@pytest.mark.parametrize('head_name', sorted(HEADS))
def test_grad_cam_pp_equals_naive_loop(head_name):
  head_fn, features = _head_fn(head_name, seed=5)
  features = jax.nn.relu(features)  # activations after a ReLU, as in the models
  got = jax.jit(cam.grad_cam_pp, static_argnums=0)(head_fn, features, _targets())
  want = naive_grad_cam_pp(head_fn, features, _targets())
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert got.max() > 0


class TinyImageClassifier(nn.Module):
  """A conv + dense classifier on 8x8 images, the `logits_fn` of Score-CAM tests."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3))(x))
    return nn.Dense(C)(x.reshape((x.shape[0], -1)))


def naive_score_cam(logits_fn, images, features, targets):
  """One masked image and one forward pass at a time."""
  maps = []
  for i in range(images.shape[0]):
    a = np.asarray(features[i])
    weights = []
    for k in range(a.shape[-1]):
      up = np.asarray(jax.image.resize(a[:, :, k], images.shape[1:3], 'bilinear'))
      span = up.max() - up.min()
      mask = (up - up.min()) / span if span > 1e-8 else np.zeros_like(up)
      logits = np.asarray(logits_fn(jnp.asarray(images[i] * mask[:, :, None])[None]))[0]
      probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
      weights.append(probs[targets[i]])
    maps.append(np.maximum(np.einsum('hwk,k->hw', a, np.array(weights)), 0))
  return np.stack(maps)


@pytest.mark.parametrize('chunk_size', [1, 3, 5, 64])
def test_score_cam_equals_naive_loop(chunk_size):
  model = TinyImageClassifier()
  images = jax.random.uniform(jax.random.key(0), (N, 8, 8, 1))
  params = model.init(jax.random.key(1), images)
  logits_fn = lambda x: model.apply(params, x)
  features = jax.nn.relu(jax.random.normal(jax.random.key(2), (N, 3, 3, 5)))
  features = features.at[0, :, :, 2].set(0.0)  # a dead channel: constant map, zero mask
  score_cam = jax.jit(cam.score_cam, static_argnums=(0, 4))
  got = score_cam(logits_fn, images, features, _targets(), chunk_size)
  np.testing.assert_allclose(
    got, naive_score_cam(logits_fn, images, features, _targets()), rtol=1e-5, atol=1e-6
  )
  assert got.shape == (N, 3, 3) and got.max() > 0


@pytest.fixture(scope='module')
def tiny_resnet():
  model = get_model('resnet18', C, width=2)
  variables = init_variables(model, jax.random.key(0), 8)
  # Non-trivial BatchNorm statistics, so evaluation mode is really exercised.
  variables['batch_stats'] = jax.tree.map(lambda s: s + 0.3, variables['batch_stats'])
  pixels = jax.random.uniform(jax.random.key(1), (N, 8, 8, 1))
  return explain.Explainer(model, mean=0.5, std=0.25, image_size=8), variables, pixels


def test_explainer_cam_equals_area_times_grad_cam(tiny_resnet):
  explainer, variables, pixels = tiny_resnet
  maps = jax.jit(explainer.raw_maps, static_argnums=0)
  h, w = explainer.model.cam_side(8), explainer.model.cam_side(8)
  np.testing.assert_allclose(
    maps('cam', variables, pixels, _targets()),
    h * w * maps('grad_cam', variables, pixels, _targets()),
    rtol=1e-4,
    atol=1e-6,
  )


def test_named_layer_gradients_equal_those_through_the_head(tiny_resnet):
  """resnet18's stage4 is the CAM layer: the perturbation route (whole model) and the
  head route must give the same per-sample gradients and maps."""
  explainer, variables, pixels = tiny_resnet
  x = (pixels - 0.5) / 0.25
  a_cam, head = explain.layer_features(explainer.model, variables, x, 'cam')
  a_st4, whole = explain.layer_features(explainer.model, variables, x, 'stage4')
  np.testing.assert_array_equal(a_cam, a_st4)
  for method in (cam.grad_cam, cam.grad_cam_pp):
    np.testing.assert_allclose(
      method(whole, a_st4, _targets()), method(head, a_cam, _targets()), rtol=1e-4, atol=1e-6
    )


def test_intermediate_layer_gradients_equal_a_hand_written_rest_of_network():
  """simple_cnn's stage2 -> conv3 -> ReLU -> flatten-dense, written out by hand."""
  model = get_model('simple_cnn', C)
  variables = init_variables(model, jax.random.key(0), 12)
  x = jax.random.normal(jax.random.key(1), (N, 12, 12, 1))
  a, head_fn = explain.layer_features(model, variables, x, 'stage2')
  params = variables['params']

  def rest(stage2):
    conv = nn.Conv(64, (3, 3), padding='SAME')
    hidden = nn.relu(conv.apply({'params': params['backbone_net']['conv3']}, stage2))
    dense = params['head_net']['dense']
    return hidden.reshape((hidden.shape[0], -1)) @ dense['kernel'] + dense['bias']

  np.testing.assert_allclose(head_fn(a), model.apply(variables, x)[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    cam.grad_cam(head_fn, a, _targets()), cam.grad_cam(rest, a, _targets()), rtol=1e-4, atol=1e-6
  )


def test_unknown_layer_and_inapplicable_cam_fail_clearly(tiny_resnet):
  explainer, variables, pixels = tiny_resnet
  with pytest.raises(ValueError, match="layer 'stage9'.*valid: cam, stage1"):
    dataclasses.replace(explainer, layer='stage9').raw_maps(
      'grad_cam', variables, pixels, _targets()
    )
  with pytest.raises(ValueError, match='cam explains the last layer only'):
    dataclasses.replace(explainer, layer='stage3').raw_maps('cam', variables, pixels, _targets())
  simple = get_model('simple_cnn', C)
  simple_vars = init_variables(simple, jax.random.key(0), 8)
  with pytest.raises(ValueError, match='no global-average-pool'):
    explain.Explainer(simple, 0.5, 0.25, 8).raw_maps('cam', simple_vars, pixels, _targets())
  with pytest.raises(ValueError, match="unknown CAM method.*'gradcam'"):
    explain.check_methods(['gradcam'])


def test_maps_are_normalised_at_image_size(tiny_resnet):
  explainer, variables, pixels = tiny_resnet
  for method in ('grad_cam', 'score_cam'):
    maps = explainer.maps(method, variables, pixels, _targets())
    assert maps.shape == (N, 8, 8)
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1 + 1e-6


def test_registry_defines_the_methods_and_unknown_ones_list_them():
  assert explain.METHODS == tuple(explain.REGISTRY)
  assert set(explain.default_methods(get_model('simple_cnn', C))) < set(explain.METHODS)
  for name, method in explain.REGISTRY.items():
    assert isinstance(method, explain.Method) and callable(method.maps), name
  with pytest.raises(ValueError, match='valid: ' + ', '.join(explain.METHODS) + '$'):
    explain.check_methods(['grad_cam', 'eigen_cam'])
  with pytest.raises(ValueError, match="unknown CAM method.*'eigen_cam'.*valid: cam, grad_cam"):
    explain.Explainer(get_model('simple_cnn', C), 0.5, 0.25, 8).raw_maps(
      'eigen_cam', {}, None, None
    )


def test_explain_never_imports_the_training_code():
  """A trained model is explained without the objective, steps or the training and eval
  loops."""
  training = ('train_lib', 'steps', 'objective', 'evaluation', 'run_setup', 'eval_lib')
  training += ('grids', 'checkpointing')
  code = (
    'import sys; import bcam_jax.explain; '
    'print(" ".join(m for m in sys.modules if m.startswith("bcam_jax")))'
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=root, capture_output=True, text=True, check=True
  )
  loaded = set(out.stdout.split())
  assert 'bcam_jax.explain.faithfulness' in loaded
  assert not {f'bcam_jax.{m}' for m in training} & loaded, loaded
