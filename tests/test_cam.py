"""Grad-CAM, Batch-CAM and the prototype losses against naive references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bcam_jax import cam, models, parallel, steps
from bcam_jax import objective as objective_lib
from bcam_jax.models.base import CamClassifier
from bcam_jax.models.convnext import PoolNormDenseHead
from bcam_jax.models.resnet import PoolDenseHead
from bcam_jax.models.simple_cnn import FlattenDenseHead
from tests import numerics

N, H, W, K, C = 6, 3, 3, 5, 4


@pytest.fixture(autouse=True)
def full_float32_matmuls():
  """On GPUs, float32 matmuls default to TF32 (a 10-bit mantissa), so a batched map and its
  per-image reference differ by about 1e-3 there (seen on an H100); these tests check the
  maths, so they run every matmul at full float32 precision (no change on CPU)."""
  with jax.default_matmul_precision('highest'):
    yield


HEADS = {
  'gap_dense': PoolDenseHead,
  'flatten_dense': FlattenDenseHead,
  'layernorm': PoolNormDenseHead,
}


def _head_fn(head_name, seed=0):
  head = HEADS[head_name](num_classes=C)
  features = jax.random.normal(jax.random.key(seed), (N, H, W, K))
  params = head.init(jax.random.key(seed + 1), features)
  return (lambda a: head.apply(params, a)), features


def naive_grad_cam(head_fn, features, targets):
  """jax.grad of one logit of one image, looped over the batch."""
  maps = []
  for i in range(features.shape[0]):
    score = lambda a: head_fn(a[None])[0, targets[i]]
    g = jax.grad(score)(features[i])
    alpha = g.mean(axis=(0, 1))
    maps.append(np.maximum(np.einsum('hwk,k->hw', features[i], alpha), 0))
  return np.stack(maps)


@pytest.mark.parametrize('head_name', sorted(HEADS))
def test_grad_cam_equals_per_sample_loop(head_name):
  head_fn, features = _head_fn(head_name)
  targets = jnp.array([0, 3, 1, 1, 2, 0])
  got = jax.jit(cam.grad_cam, static_argnums=0)(head_fn, features, targets)
  np.testing.assert_allclose(got, naive_grad_cam(head_fn, features, targets), atol=1e-5)
  assert got.shape == (N, H, W) and (got >= 0).all()


@pytest.mark.parametrize('head_name', sorted(HEADS))
def test_batch_cam_equals_per_class_reference(head_name):
  head_fn, features = _head_fn(head_name, seed=3)
  labels = np.array([2, 0, 2, 2, 0, 1])  # class 3 is absent
  cams, counts = jax.jit(cam.batch_cam, static_argnums=(0, 3))(head_fn, features, labels, C)
  np.testing.assert_array_equal(counts, [2, 1, 3, 0])
  for c in range(C):
    members = np.flatnonzero(labels == c)
    if not len(members):
      np.testing.assert_array_equal(cams[c], 0.0)
      continue
    grads = [jax.grad(lambda a: head_fn(a[None])[0, c])(features[i]) for i in members]
    alpha = np.mean(grads, axis=0).mean(axis=(0, 1))
    a_bar = np.asarray(features)[members].mean(axis=0)
    expected = np.maximum(np.einsum('hwk,k->hw', a_bar, alpha), 0)
    np.testing.assert_allclose(cams[c], expected, atol=1e-5)


def test_normalize_and_upsample():
  maps = jnp.stack([jnp.arange(9.0).reshape(3, 3), jnp.full((3, 3), 2.5)])
  normed = cam.normalize_cam(maps)
  np.testing.assert_allclose(normed[0], np.arange(9.0).reshape(3, 3) / 8.0)
  np.testing.assert_array_equal(normed[1], 0.0)  # constant map: zeros, not NaN
  grad = jax.grad(lambda m: cam.normalize_cam(m).sum())(maps)
  assert np.isfinite(grad).all()
  up = cam.upsample_cam(normed, 28)
  assert up.shape == (2, 28, 28)
  assert float(up.min()) >= 0.0 and float(up.max()) <= 1.0


def test_map_distances_and_losses_by_hand():
  m = jnp.array([[[0.0, 1.0], [1.0, 0.0]]])
  p = jnp.array([[[0.5, 0.5], [1.0, 1.0]]])
  np.testing.assert_allclose(objective_lib.map_distance(m, p, 'l1'), [0.5])
  np.testing.assert_allclose(objective_lib.map_distance(m, p, 'l2'), [(0.25 + 0.25 + 0 + 1) / 4])
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.uniform(size=(3, 16, 16)), jnp.float32)
  np.testing.assert_allclose(objective_lib.map_distance(a, a, 'ssim'), 0.0, atol=1e-5)
  assert (objective_lib.map_distance(a, 1 - a, 'ssim') > 0.5).all()
  protos = jnp.asarray(rng.uniform(size=(4, 16, 16)), jnp.float32)
  labels = jnp.array([1, 3, 3])
  expected = np.mean([np.abs(a[i] - protos[labels[i]]).mean() for i in range(3)])
  np.testing.assert_allclose(
    objective_lib.prototype_loss(a, labels, protos, 'l1'), expected, rtol=1e-6
  )
  counts = jnp.array([0.0, 2.0, 0.0, 1.0])
  cams = jnp.asarray(rng.uniform(size=(4, 16, 16)), jnp.float32)
  expected = sum(np.abs(cams[c] - protos[c]).mean() for c in (1, 3))
  np.testing.assert_allclose(
    objective_lib.batch_cam_loss(cams, counts, protos, 'l1'), expected, rtol=1e-6
  )


@pytest.mark.parametrize('kind', objective_lib.LOSS_KINDS)
def test_lambda_class_weights_cross_entropy_under_every_kind(kind):
  """total = lambda_class * CE + lambda_cam * term + penalty, 'ce' included (its term is 0)."""
  objective = objective_lib.Objective(
    kind=kind, metric='l1', lambda_class=0.25, lambda_cam=2.0, num_classes=C, prototype_size=4
  )
  term = 0.0 if kind == 'ce' else 3.0
  np.testing.assert_allclose(
    objective.total(jnp.float32(8.0), term, 0.5), 0.25 * 8 + 2 * term + 0.5
  )


class _TinyBackbone(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = jnp.tanh(nn.Conv(3, (3, 3), strides=2, param_dtype=x.dtype)(x))
    return {'cam': x}


class _TinyHead(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, a):
    h = jnp.tanh(nn.Dense(4, param_dtype=a.dtype)(a))  # spatially varying gradients
    return nn.Dense(self.num_classes, param_dtype=a.dtype)(h.reshape(a.shape[0], -1))


class TinyCamModel(CamClassifier):
  """Conv + tanh backbone, a non-linear per-sample head: a smooth second-order path."""

  def setup(self):
    self.backbone_net = _TinyBackbone()
    self.head_net = _TinyHead(self.num_classes)

  def cam_side(self, image_side):
    return -(-image_side // 2)

  def label(self):
    return 'tiny'


def _tiny_problem(kind, metric, size=12, n=8, dtype=jnp.float32, cam_gradient='full'):
  model = TinyCamModel(num_classes=C)
  x = jax.random.normal(jax.random.key(0), (n, size, size, 1), dtype)
  params = model.init(jax.random.key(1), x)['params']
  labels = jnp.array([0, 1, 1, 3, 0, 0, 1, 3][:n])
  prototypes = jax.random.uniform(jax.random.key(2), (C, size, size), dtype)
  objective = objective_lib.Objective(
    kind=kind,
    metric=metric,
    lambda_cam=2.0,
    num_classes=C,
    prototype_size=size,
    cam_gradient=cam_gradient,
  )
  loss_fn = steps.make_loss_fn(model, objective)
  return loss_fn, params, x, labels, prototypes


@pytest.mark.parametrize('kind', ['proto', 'bcpl'])
@pytest.mark.parametrize('metric', list(objective_lib.METRICS))
def test_total_loss_gradients_match_finite_differences(kind, metric):
  """check_grads through features, head gradients and the map distance (second order)."""
  with jax.enable_x64(True):
    loss_fn, params, x, labels, prototypes = _tiny_problem(kind, metric, dtype=jnp.float64)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    f = lambda p: loss_fn(p, {}, x, labels, prototypes, jax.random.key(0))[0]
    assert f(params).dtype == jnp.float64
    check_grads(f, (params,), order=1, modes=['rev'], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('kind', ['proto', 'bcpl'])
def test_through_features_differentiates_with_g_held_constant(kind):
  """cam_gradient='through_features' trains the CAM term through A alone. Reference: f(p),
  the loss with A and the logits from p but G = dS_y/dA computed once at p0 and passed in
  as a constant (no stop_gradient anywhere), whose autodiff gradient finite differences
  check; the mode's gradient at p0 equals f's, and differs from 'full''s, whose own
  finite-difference check is test_total_loss_gradients_match_finite_differences."""
  with jax.enable_x64(True):
    loss_fn, p0, x, labels, prototypes = _tiny_problem(
      kind, 'l2', dtype=jnp.float64, cam_gradient='through_features'
    )
    p0 = jax.tree.map(lambda p: p.astype(jnp.float64), p0)
    full_fn = _tiny_problem(kind, 'l2', dtype=jnp.float64)[0]
    model = TinyCamModel(num_classes=C)
    full = objective_lib.Objective(
      kind=kind, metric='l2', lambda_cam=2.0, num_classes=C, prototype_size=x.shape[1]
    )

    def features_and_head(p):
      features = model.apply({'params': p}, x, method='backbone')
      return features['cam'], models.head_fn(model, {'params': p}, features)

    a0, head0 = features_and_head(p0)
    g0 = np.asarray(cam.head_gradients(head0, a0, labels)[1])  # a constant of f

    def f(p):
      a, head = features_and_head(p)
      ce = objective_lib.cross_entropy(head(a), labels).mean()
      explanation = objective_lib.GradCamExplanation(a, jnp.asarray(g0))
      return full.total(ce, full.cam_term(explanation, labels, prototypes))

    mode = lambda p: loss_fn(p, {}, x, labels, prototypes, jax.random.key(0))[0]
    np.testing.assert_allclose(mode(p0), f(p0), rtol=1e-12)
    check_grads(f, (p0,), order=1, modes=['rev'], atol=1e-5, rtol=1e-4)
    reference = jax.grad(f)(p0)
    numerics.assert_trees_close(jax.grad(mode)(p0), reference, rtol=1e-10)
    full_grads = jax.grad(lambda p: full_fn(p, {}, x, labels, prototypes, jax.random.key(0))[0])
    relative = jax.tree.map(
      lambda u, v: float(jnp.abs(u - v).max() / jnp.abs(u).max()), full_grads(p0), reference
    )
    assert max(jax.tree.leaves(relative)) > 0.01, relative


@pytest.mark.parametrize('kind', ['proto', 'bcpl'])
def test_cam_term_has_gradient_through_head_gradients(kind):
  """The CAM term is not constant in the head's parameters: G depends on them."""
  loss_fn, params, x, labels, prototypes = _tiny_problem(kind, 'l1')
  cam_term = lambda p: loss_fn(p, {}, x, labels, prototypes, jax.random.key(0))[1]['cam']
  g = jax.grad(cam_term)(params)
  assert float(jnp.abs(g['head_net']['Dense_1']['kernel']).sum()) > 0


@pytest.mark.parametrize('kind', ['proto', 'bcpl'])
def test_loss_and_gradients_same_on_one_and_eight_devices(kind):
  """The class sums and the loss are over the global batch. In float64, where the two
  meshes' different summation orders cannot move the maps' ReLU, min and max (the loss's
  kinks) to the other side of a tie (tests/numerics.py)."""
  with jax.enable_x64(True):
    loss_fn, params, x, labels, prototypes = _tiny_problem(kind, 'ssim', n=8, dtype=jnp.float64)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    results = []
    for n_dev in (1, 8):
      mesh = parallel.make_mesh(jax.devices()[:n_dev])
      xs, ys = parallel.shard_batch(mesh, np.asarray(x), np.asarray(labels))
      (loss, aux), grads = grad_fn(params, {}, xs, ys, prototypes, jax.random.key(0))
      results.append(jax.device_get((loss, aux['cam'], grads)))
  (l1, c1, g1), (l8, c8, g8) = results
  assert g1['head_net']['Dense_1']['kernel'].dtype == np.float64
  np.testing.assert_allclose(l8, l1, rtol=1e-12)
  np.testing.assert_allclose(c8, c1, rtol=1e-12)
  numerics.assert_trees_close(g8, g1, rtol=1e-12)
