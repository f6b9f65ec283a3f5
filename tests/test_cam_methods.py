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
from jax.test_util import check_grads

from bcam_jax import cam, explain
from bcam_jax.models import get_model, init_variables
from tests.test_cam import HEADS, C, H, K, N, W, _head_fn, naive_grad_cam


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
  with pytest.raises(
    ValueError, match=r"layer 'stage9' is not a layer of .*nearest: stage4 \(6, 1, 1, 16\), stage3"
  ):
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
    explain.check_methods(['grad_cam', 'fullgrad'])
  with pytest.raises(ValueError, match="unknown CAM method.*'fullgrad'.*valid: cam, grad_cam"):
    explain.Explainer(get_model('simple_cnn', C), 0.5, 0.25, 8).raw_maps('fullgrad', {}, None, None)


def test_explain_never_imports_the_training_code():
  """A trained model is explained without the objective, steps or the training and eval
  loops."""
  training = ('train_lib', 'steps', 'objective', 'split_loop', 'run_setup', 'eval_lib')
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


def _score(head_fn, targets, i):
  """S_i as a function of image i's features: its target logit, or the callable's value."""
  if callable(targets):
    return lambda a: targets(head_fn(a[None]))[0]
  return lambda a: head_fn(a[None])[0, targets[i]]


def _naive_grads(head_fn, features, targets, i):
  """G of image i alone, in float64 numpy: jax.grad of its one score."""
  return np.asarray(jax.grad(_score(head_fn, targets, i))(features[i]), np.float64)


def naive_xgrad_cam(head_fn, features, targets, eps=1e-7):
  maps = []
  for i in range(features.shape[0]):
    a, g = np.asarray(features[i], np.float64), _naive_grads(head_fn, features, targets, i)
    weights = [
      (g[:, :, c] * a[:, :, c]).sum() / (a[:, :, c].sum() + eps) for c in range(a.shape[-1])
    ]
    maps.append(np.maximum(np.einsum('hwk,k->hw', a, np.array(weights)), 0))
  return np.stack(maps)


def naive_elementwise_cam(head_fn, features, targets, positive_grads):
  """HiResCAM (positive_grads=False) or LayerCAM, one channel at a time."""
  maps = []
  for i in range(features.shape[0]):
    a, g = np.asarray(features[i], np.float64), _naive_grads(head_fn, features, targets, i)
    total = np.zeros(a.shape[:2])
    for c in range(a.shape[-1]):
      total += (np.maximum(g[:, :, c], 0) if positive_grads else g[:, :, c]) * a[:, :, c]
    maps.append(np.maximum(total, 0))
  return np.stack(maps)


NAIVE_GRADIENT_METHODS = {
  'xgrad_cam': naive_xgrad_cam,
  'hires_cam': lambda h, f, t: naive_elementwise_cam(h, f, t, positive_grads=False),
  'layer_cam': lambda h, f, t: naive_elementwise_cam(h, f, t, positive_grads=True),
}


def naive_eigen_cam(features):
  """numpy.linalg.svd per image; the projection negated where |min| > |max|."""
  maps = []
  for a in np.asarray(features, np.float64):
    x = a.reshape(-1, a.shape[-1])
    x = x - x.mean(axis=0)
    projection = x @ np.linalg.svd(x)[2][0]
    if abs(projection.min()) > abs(projection.max()):
      projection = -projection
    maps.append(np.maximum(projection, 0).reshape(a.shape[:2]))
  return np.stack(maps)


def test_eigen_cam_of_negated_features_equals_numpy_svd():
  _, features = _head_fn('gap_dense', seed=9)
  features = jax.nn.relu(features)
  np.testing.assert_allclose(cam.eigen_cam(-features), naive_eigen_cam(-features), atol=1e-5)


def naive_ablation_cam(head_fn, features, targets):
  """One image with one channel zeroed at a time."""
  maps = []
  for i in range(features.shape[0]):
    a = np.asarray(features[i])
    score = float(_score(head_fn, targets, i)(jnp.asarray(a)))
    weights = []
    for c in range(a.shape[-1]):
      ablated = a.copy()
      ablated[:, :, c] = 0
      weights.append((score - float(_score(head_fn, targets, i)(jnp.asarray(ablated)))) / score)
    maps.append(np.maximum(np.einsum('hwk,k->hw', a, np.array(weights)), 0))
  return np.stack(maps)


@pytest.mark.parametrize('head_name', sorted(HEADS))
@pytest.mark.parametrize('chunk_size', [1, 3, 5, 64])
def test_ablation_cam_equals_naive_loop(head_name, chunk_size):
  head_fn, features = _head_fn(head_name, seed=11)
  features = jax.nn.relu(features)
  got = jax.jit(cam.ablation_cam, static_argnums=(0, 3))(head_fn, features, _targets(), chunk_size)
  want = naive_ablation_cam(head_fn, features, _targets())
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert got.shape == features.shape[:3] and got.max() > 0


def test_ablation_cam_with_zero_score_gives_zero_weights():
  """S = 0 (a head whose target logit is 0 everywhere): zero maps, not NaN."""
  _, features = _head_fn('gap_dense')
  head_fn = lambda a: jnp.zeros((a.shape[0], C)).at[:, 1].set(jnp.mean(a, axis=(1, 2, 3)))
  np.testing.assert_array_equal(cam.ablation_cam(head_fn, features, jnp.zeros(N, int)), 0.0)


def test_callable_target_of_one_logit_equals_integer_targets():
  head_fn, features = _head_fn('layernorm', seed=13)
  features = jax.nn.relu(features)
  targets = jnp.full(N, 3)
  pick = lambda logits: logits[:, 3]
  for method in (cam.grad_cam, cam.grad_cam_pp, cam.xgrad_cam, cam.layer_cam, cam.ablation_cam):
    np.testing.assert_allclose(
      method(head_fn, features, pick), method(head_fn, features, targets), rtol=1e-6, atol=1e-7
    )
  np.testing.assert_array_equal(cam.target_scores(head_fn(features), pick), head_fn(features)[:, 3])


def test_callable_targets_of_score_cam():
  """Score-CAM's score for a callable is its value: the class probability reproduces the
  default, the class logit reproduces `channel_softmax`, with chunks that repeat rows."""
  model = TinyImageClassifier()
  images = jax.random.uniform(jax.random.key(0), (N, 8, 8, 1))
  params = model.init(jax.random.key(1), images)
  logits_fn = lambda x: model.apply(params, x)
  features = jax.nn.relu(jax.random.normal(jax.random.key(2), (N, 3, 3, 5)))
  targets = jnp.full(N, 2)
  for softmax, score in (
    (False, lambda logits: jax.nn.softmax(logits)[:, 2]),
    (True, lambda logits: logits[:, 2]),
  ):
    np.testing.assert_allclose(
      cam.score_cam(logits_fn, images, features, score, 3, channel_softmax=softmax),
      cam.score_cam(logits_fn, images, features, targets, 3, channel_softmax=softmax),
      rtol=1e-6,
      atol=1e-7,
    )


def test_score_cam_channel_softmax_equals_naive_loop():
  """pytorch-grad-cam's weighting: softmax over the channels of the masked target logits."""
  model = TinyImageClassifier()
  images = jax.random.uniform(jax.random.key(3), (N, 8, 8, 1))
  params = model.init(jax.random.key(4), images)
  logits_fn = lambda x: model.apply(params, x)
  features = jax.nn.relu(jax.random.normal(jax.random.key(5), (N, 3, 3, 5)))
  maps = []
  for i in range(N):
    a = np.asarray(features[i])
    logits = []
    for c in range(a.shape[-1]):
      up = np.asarray(jax.image.resize(a[:, :, c], (8, 8), 'bilinear'))
      mask = (up - up.min()) / max(up.max() - up.min(), 1e-8)
      logits.append(float(logits_fn(images[i : i + 1] * mask[None, :, :, None])[0, _targets()[i]]))
    weights = np.exp(np.array(logits) - max(logits))
    maps.append(np.maximum(np.einsum('hwk,k->hw', a, weights / weights.sum()), 0))
  got = cam.score_cam(logits_fn, images, features, _targets(), 2, channel_softmax=True)
  np.testing.assert_allclose(got, np.stack(maps), rtol=1e-5, atol=1e-6)


def test_callable_probability_target_equals_naive_probability_gradient():
  head_fn, features = _head_fn('flatten_dense', seed=17)
  prob = lambda logits: jax.nn.softmax(logits)[:, 1]
  want = naive_grad_cam(lambda a: jax.nn.softmax(head_fn(a))[:, None, 1], features, [0] * N)
  np.testing.assert_allclose(cam.grad_cam(head_fn, features, prob), want, rtol=1e-4, atol=1e-7)
  assert want.max() > 0


def test_callable_sum_of_classes_adds_the_gradients():
  """G is linear in the score: G(S_1 + S_2) = G(S_1) + G(S_2), and so is Grad-CAM's map
  before its ReLU."""
  head_fn, features = _head_fn('layernorm', seed=19)
  both = lambda logits: logits[:, 1] + logits[:, 2]
  _, g = cam.head_gradients(head_fn, features, both)
  g1 = np.stack([_naive_grads(head_fn, features, [1] * N, i) for i in range(N)])
  g2 = np.stack([_naive_grads(head_fn, features, [2] * N, i) for i in range(N)])
  np.testing.assert_allclose(g, g1 + g2, rtol=1e-5, atol=1e-7)
  a = np.asarray(features, np.float64)
  before_relu = [np.einsum('nhwk,nk->nhw', a, gc.mean(axis=(1, 2))) for gc in (g1, g2)]
  np.testing.assert_allclose(
    cam.grad_cam(head_fn, features, both), np.maximum(sum(before_relu), 0), rtol=1e-4, atol=1e-6
  )


SHARDED_METHODS = {
  'grad_cam': cam.grad_cam,
  'xgrad_cam': cam.xgrad_cam,
  'layer_cam': cam.layer_cam,
  'hires_cam': cam.hires_cam,
  'ablation_cam': lambda h, f, t: cam.ablation_cam(h, f, t, chunk_size=2),
  'eigen_cam': lambda h, f, t: cam.eigen_cam(f),
  'grad_cam_prob': lambda h, f, t: cam.grad_cam(h, f, lambda logits: jax.nn.softmax(logits)[:, 2]),
  'finer_cam': cam.finer_cam,
  'shapley_cam': cam.shapley_cam,
  'kpca_cam': lambda h, f, t: cam.kpca_cam(f),
  'fem': lambda h, f, t: cam.fem(f),
}


@pytest.mark.parametrize('method', sorted(SHARDED_METHODS))
def test_maps_same_on_one_and_eight_devices(method):
  """Every map is per sample: a batch sharded over 8 devices gives the 1-device maps."""
  head_fn, _ = _head_fn('layernorm', seed=23)
  features = jax.nn.relu(jax.random.normal(jax.random.key(24), (8, H, W, K)))
  targets = jnp.array([0, 3, 1, 1, 2, 0, 3, 2])
  fn = jax.jit(lambda f, t: SHARDED_METHODS[method](head_fn, f, t))
  sharded, single = _on_eight_and_one_devices(fn, features, targets)
  np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-7)
  assert single.max() > 0


def _on_eight_and_one_devices(fn, *batches):
  """`fn`'s result with its arguments' batch sharded over 8 devices, and on one."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ('batch',))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  sharded = fn(*(jax.device_put(b, batch) for b in batches))
  assert len(sharded.sharding.device_set) == 8
  return sharded, fn(*(jax.device_put(b, jax.devices()[0]) for b in batches))


@pytest.mark.parametrize(
  'method', ['xgrad_cam', 'hires_cam', 'layer_cam', 'grad_cam_elementwise', 'finer_cam']
)
@pytest.mark.parametrize('head_name', sorted(HEADS))
def test_gradient_methods_gradients_match_finite_differences(method, head_name):
  """Differentiable w.r.t. the features, through G (second order for a non-linear head)."""
  with jax.enable_x64(True):
    head_fn, features = _head_fn(head_name, seed=29)
    features = jax.nn.relu(features.astype(jnp.float64)) + 0.1
    f = lambda a: jnp.sum(jnp.sin(getattr(cam, method)(head_fn, a, _targets())))
    assert f(features).dtype == jnp.float64
    check_grads(f, (features,), order=1, modes=['rev'], atol=1e-5, rtol=1e-4)


def naive_grad_cam_elementwise(head_fn, features, targets):
  """Per image, per channel: ReLU(G_k * A_k) summed over the channels."""
  maps = []
  for i in range(features.shape[0]):
    a, g = np.asarray(features[i], np.float64), _naive_grads(head_fn, features, targets, i)
    maps.append(sum(np.maximum(g[:, :, c] * a[:, :, c], 0) for c in range(a.shape[-1])))
  return np.stack(maps)


def naive_shapley_cam(head_fn, features, targets):
  """Per image: G by jax.grad and H A by the full Hessian of its one score, in float64."""
  maps = []
  for i in range(features.shape[0]):
    a = np.asarray(features[i], np.float64)
    g = _naive_grads(head_fn, features, targets, i)
    hessian = np.asarray(jax.hessian(_score(head_fn, targets, i))(features[i]), np.float64)
    hessian_a = np.einsum('hwkxyc,xyc->hwk', hessian, a)
    weights = (g - 0.5 * hessian_a).mean(axis=(0, 1))
    maps.append(np.maximum(np.einsum('hwk,k->hw', a, weights), 0))
  return np.stack(maps)


def naive_finer_cam(head_fn, features, targets, alpha, ranks=(1, 2, 3)):
  """Per image: the classes nearest the target by |logit difference| in numpy, then
  jax.grad of Finer-CAM's weighted difference written out for that image alone."""
  maps = []
  for i in range(features.shape[0]):
    logits = np.asarray(head_fn(features[i][None])[0], np.float64)
    t = int(targets[i])
    nearest = np.argsort(np.abs(logits - logits[t]), kind='stable')[list(ranks)]

    def score(a, nearest=nearest, t=t):
      s = head_fn(a[None])[0]
      p = jax.nn.softmax(s)[nearest]
      return jnp.sum(p * (s[t] - alpha * s[nearest])) / (jnp.sum(p) + 1e-9)

    g = np.asarray(jax.grad(score)(features[i]), np.float64)
    a = np.asarray(features[i], np.float64)
    maps.append(np.maximum(np.einsum('hwk,k->hw', a, g.mean(axis=(0, 1))), 0))
  return np.stack(maps)


def naive_sign_corrected_projection(values):
  """numpy.linalg.svd per image of `(h w, K)` centred values, |min| > |max| negated, ReLU."""
  return naive_eigen_cam(values)


def naive_fem(features, k=2.0):
  """Per image, per channel: the share of positions above mean + k std as its weight."""
  maps = []
  for a in np.asarray(features, np.float64):
    weights = [
      (a[:, :, c] > a[:, :, c].mean() + k * a[:, :, c].std()).mean() for c in range(a.shape[-1])
    ]
    maps.append(np.maximum(np.einsum('hwk,k->hw', a, np.array(weights)), 0))
  return np.stack(maps)


def naive_kpca_cam(features, gamma=None):
  """Per image: the sigmoid kernel of the centred positions, centred (scikit-learn's
  KernelCenterer written out), numpy.linalg.eigh, the first component scaled by the root of
  its eigenvalue, the largest |entry| made positive, ReLU."""
  maps = []
  for a in np.asarray(features, np.float64):
    x = a.reshape(-1, a.shape[-1])
    x = x - x.mean(axis=0)
    g = 1.0 / x.shape[1] if gamma is None else gamma
    kmat = np.tanh(g * x @ x.T + 1.0)
    p = kmat.shape[0]
    ones = np.full((p, p), 1.0 / p)
    kmat = kmat - ones @ kmat - kmat @ ones + ones @ kmat @ ones
    values, vectors = np.linalg.eigh(kmat)
    projection = vectors[:, -1] * np.sqrt(values[-1])
    if abs(projection.min()) > abs(projection.max()):
      projection = -projection
    maps.append(np.maximum(projection, 0).reshape(a.shape[:2]))
  return np.stack(maps)


# The methods of issue 35, defined below beside their references.
NAIVE_GRADIENT_METHODS |= {
  'grad_cam_elementwise': naive_grad_cam_elementwise,
  'shapley_cam': naive_shapley_cam,
  'finer_cam': lambda h, f, t: naive_finer_cam(h, f, t, alpha=1.0),
  'eigen_grad_cam': lambda h, f, t: naive_sign_corrected_projection(
    np.asarray(f, np.float64) * np.stack([_naive_grads(h, f, t, i) for i in range(f.shape[0])])
  ),
  'seg_eigen_cam': lambda h, f, t: naive_sign_corrected_projection(
    np.asarray(f, np.float64)
    * np.abs(np.stack([_naive_grads(h, f, t, i) for i in range(f.shape[0])]))
  ),
}


@pytest.mark.parametrize('method', sorted(NAIVE_GRADIENT_METHODS))
@pytest.mark.parametrize('head_name', sorted(HEADS))
def test_gradient_methods_equal_naive_loops(method, head_name):
  head_fn, features = _head_fn(head_name, seed=7)
  features = jax.nn.relu(features)
  got = jax.jit(getattr(cam, method), static_argnums=0)(head_fn, features, _targets())
  want = NAIVE_GRADIENT_METHODS[method](head_fn, features, _targets())
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert got.shape == features.shape[:3] and got.dtype == jnp.float32 and got.max() > 0


def test_shapley_cam_is_grad_cam_for_a_linear_head_and_not_for_a_curved_one():
  head_fn, features = _head_fn('gap_dense', seed=33)
  features = jax.nn.relu(features)
  np.testing.assert_allclose(
    cam.shapley_cam(head_fn, features, _targets()),
    cam.grad_cam(head_fn, features, _targets()),
    rtol=1e-5,
    atol=1e-6,
  )
  curved_fn, features = _head_fn('layernorm', seed=33)
  shapley = cam.shapley_cam(curved_fn, jax.nn.relu(features), _targets())
  assert np.abs(shapley - cam.grad_cam(curved_fn, jax.nn.relu(features), _targets())).max() > 1e-4


def test_finer_cam_with_alpha_zero_is_grad_cam_of_the_target():
  """alpha=0: sum_j p_j S_t / sum_j p_j = S_t, differentiated through p too, which cancels."""
  head_fn, features = _head_fn('layernorm', seed=35)
  features = jax.nn.relu(features)
  np.testing.assert_allclose(
    cam.finer_cam(head_fn, features, _targets(), alpha=0.0),
    cam.grad_cam(head_fn, features, _targets()),
    rtol=1e-4,
    atol=1e-6,
  )


@pytest.mark.parametrize('k', [1.0, 2.0])
def test_fem_equals_naive_loop(k):
  _, features = _head_fn('gap_dense', seed=37)
  features = jax.nn.relu(features)
  got = jax.jit(cam.fem, static_argnums=1)(features, k)
  np.testing.assert_allclose(got, naive_fem(features, k), rtol=1e-5, atol=1e-6)
  assert got.max() > 0


@pytest.mark.parametrize('method', ['eigen_cam', 'kpca_cam'])
def test_class_agnostic_methods_equal_numpy_per_image(method):
  """Eigen-CAM against numpy's SVD, KPCA-CAM against numpy's eigh of the centred kernel."""
  _, features = _head_fn('gap_dense', seed=39)
  features = jax.nn.relu(features)
  got = jax.jit(getattr(cam, method))(features)
  want = {'eigen_cam': naive_eigen_cam, 'kpca_cam': naive_kpca_cam}[method](features)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert got.shape == features.shape[:3] and (got.max(axis=(1, 2)) > 0).all()


def test_linear_kernel_pca_is_eigen_cam_and_unknown_kernels_fail():
  _, features = _head_fn('gap_dense', seed=39)
  features = jax.nn.relu(features)
  linear = cam.kpca_cam(features, kernel='linear')  # linear kernel PCA is PCA: Eigen-CAM
  eigen = cam.eigen_cam(features)
  np.testing.assert_allclose(
    cam.normalize_cam(linear), cam.normalize_cam(eigen), rtol=1e-4, atol=1e-4
  )
  with pytest.raises(ValueError, match="kernel='cubic'; expected one of sigmoid"):
    cam.kpca_cam(features, kernel='cubic')


class TwoConvNet(nn.Module):
  """conv1 (8x8) and conv2 (4x4), both ReLU'd, then GAP + dense: two layers to explain."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), name='conv1')(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, name='conv2')(x))
    return nn.Dense(C)(x.mean((1, 2)))


@pytest.fixture(scope='module')
def two_conv():
  net = TwoConvNet()
  pixels = jax.random.uniform(jax.random.key(41), (N, 8, 8, 3))
  variables = net.init(jax.random.key(42), pixels)
  return explain.Explainer(net, mean=0.5, std=0.25, layer='conv1'), variables, pixels


def test_refine_fusion_is_the_product_of_the_layers_maps(two_conv):
  explainer, variables, pixels = two_conv
  layers = ['conv1', 'conv2']
  mean = dataclasses.replace(explainer, layer=layers)
  product = dataclasses.replace(mean, fusion='product')
  per_layer = [
    dataclasses.replace(explainer, layer=name).maps('grad_cam_pp', variables, pixels, _targets())
    for name in layers
  ]
  want = cam.normalize_cam(per_layer[0] * per_layer[1])
  got = product.maps('grad_cam_pp', variables, pixels, _targets())
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert (got.max(axis=(1, 2)) > 0.99).all()
  assert np.abs(mean.maps('grad_cam_pp', variables, pixels, _targets()) - want).max() > 1e-3
  with pytest.raises(ValueError, match="fusion='max'; expected one of mean, product"):
    dataclasses.replace(mean, fusion='max')


NEW_METHODS = (
  'grad_cam_elementwise',
  'shapley_cam',
  'finer_cam',
  'eigen_grad_cam',
  'seg_eigen_cam',
  'kpca_cam',
  'fem',
)


@pytest.mark.parametrize('method', NEW_METHODS)
def test_new_methods_through_the_explainer(two_conv, method):
  """By name, at an inner layer of a linen model: under jit, the raw maps are the
  `bcam_jax.cam` function's of that layer, and the maps are at image size in [0, 1]."""
  explainer, variables, pixels = two_conv
  maps = jax.jit(explainer.maps, static_argnums=0)(method, variables, pixels, _targets())
  assert maps.shape == pixels.shape[:3]
  assert float(maps.min()) >= 0 and float(maps.max()) <= 1 + 1e-6
  assert (maps.max(axis=(1, 2)) > 0.99).all()
  features, head_fn = explainer.features(variables, pixels, 'conv1')
  fn = getattr(cam, method)
  direct = fn(features) if method in ('kpca_cam', 'fem') else fn(head_fn, features, _targets())
  raw = explainer.raw_maps(method, variables, pixels, _targets())
  np.testing.assert_allclose(raw, direct, rtol=1e-5, atol=1e-6)


WHOLE_NETWORK_METHODS = {
  'guided_backprop': lambda e, v, p, t: e.maps('guided_backprop', v, p, t),
  'full_grad': lambda e, v, p, t: e.maps('full_grad', v, p, t),
  # 2 concepts of conv1's 6 channels, whose NMF converges: 5 stop unconverged at 200
  # iterations, where a batch's other shape rounds the products differently (7e-4 apart).
  'deep_feature_factorization': lambda e, v, p, t: dataclasses.replace(e, dff_components=2).maps(
    'deep_feature_factorization', v, p, t
  ),
  'sess': lambda e, v, p, t: e.sess(v, p, t, scales=[8, 11], step_size=4),
}


@pytest.mark.parametrize('method', sorted(WHOLE_NETWORK_METHODS))
def test_whole_network_methods_same_on_one_and_eight_devices(two_conv, method):
  """The methods that run the whole network (or factorize each image) are per sample too:
  the batch sharded over 8 devices gives the 1-device maps."""
  explainer, variables, _ = two_conv
  pixels = jax.random.uniform(jax.random.key(43), (8, 8, 8, 3))
  targets = jnp.array([0, 3, 1, 1, 2, 0, 3, 2])
  fn = jax.jit(lambda p, t: WHOLE_NETWORK_METHODS[method](explainer, variables, p, t))
  sharded, single = _on_eight_and_one_devices(fn, pixels, targets)
  # maps in [0, 1] from batches of 1 and of 8: float32 rounding of other shapes
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
  assert (single.max(axis=(1, 2)) > 0.99).all()
