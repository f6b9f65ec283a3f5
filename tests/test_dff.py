"""Deep Feature Factorization (`cam.deep_feature_factorization`, `cam.dff_cam`) and its
NMF (`bcam_jax.nmf`): the NMF against scikit-learn's `NMF` (where scikit-learn is
installed), the whole method against a numpy loop over the images, and against
pytorch-grad-cam's `DeepFeatureFactorization` on a PyTorch twin with identical weights
(where torch is installed).

Tolerances. Both NMFs run in float32 (scikit-learn keeps float32 input in float32, and
pytorch-grad-cam passes it float32 activations) with the same initial draws and the same
updates; only the order of the sums differs (OpenBLAS against XLA, the Cython loop's
sequential sums against vectorized ones). Each iteration starts from the last one's
rounding, so the factors drift apart by a few float32 ulps per iteration: measured up to
2.7e-6 of the factor's largest entry against scikit-learn (after 200 iterations), 5.6e-6
against the numpy loop and 8.2e-6 against pytorch-grad-cam (whose activations already differ
from ours by 7e-7); `NMF_RTOL` leaves a margin of 2.4x. The iteration counts agree exactly in
every case here (the stopping ratio never falls within rounding of `tol`). The stopping rule
compares violation ratios, so on other data rounding could end one side an iteration
earlier; a differing count would then show as a difference of the order of one iteration's
change, not as a bug of the order of the factors.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcam_jax import cam, explain, nmf
from tests.numerics import relative_difference

# Normwise relative difference of the factors (see the module docstring): measured 8.2e-6.
NMF_RTOL = 2e-5
# pytorch-grad-cam's explanations are each min-max scaled on their own, which divides a
# concept's difference by its own largest entry. Two of the twin's images stop at max_iter
# unconverged, where the two float32 runs drift apart fastest: on the 4th, each is 2.3e-5 /
# 2.6e-5 (of a concept's maximum) from scikit-learn's float64 run and 4.8e-5 from the
# other; the scaled maps differ by up to 6.6e-5 (8.6e-6 with the batch as one matrix), and
# 2e-4 leaves a margin of 3x.
MAP_TOLERANCE = 2e-4
# (samples, features, components): 74, 41, 193 and 200 (max_iter) iterations.
SHAPES = ((6, 25, 3), (8, 16, 5), (16, 36, 6), (30, 20, 7))
N, H, W, K, CLASSES = 4, 5, 5, 6, 4
TARGETS = np.array([0, 3, 1, 2])


def _nonnegative(rng, shape):
  """ReLU'd Gaussian entries times a random scale: non-negative, about half zeros, as the
  activations after a ReLU."""
  return (np.maximum(rng.normal(size=shape), 0) * rng.uniform(0.5, 3)).astype(np.float32)


@pytest.mark.parametrize('samples, features, components', SHAPES)
def test_nmf_equals_scikit_learn(samples, features, components, record_property):
  """scikit-learn's NMF(init='random', random_state=0) with its defaults: coordinate
  descent, tol 1e-4, at most 200 iterations (the last shape reaches them, unconverged)."""
  pytest.importorskip('sklearn')
  from sklearn.decomposition import NMF

  x = _nonnegative(np.random.default_rng(samples), (samples, features))
  model = NMF(components, init='random', random_state=0)
  with warnings.catch_warnings():  # ConvergenceWarning where it stops at max_iter
    warnings.simplefilter('ignore')
    w = model.fit_transform(x)
  ours = jax.jit(nmf.nmf, static_argnums=1)(jnp.asarray(x), components)
  assert int(ours.n_iter) == model.n_iter_
  difference = relative_difference((ours.w, ours.h), (w, model.components_))
  record_property('max_rel_difference', difference)
  print(f'NMF {samples}x{features}, {components}: {model.n_iter_} iterations, {difference:.1e}')
  assert difference < NMF_RTOL


def test_batched_nmf_equals_each_matrix_alone():
  """Under `vmap` the while loop runs until the slowest matrix stops; each matrix keeps the
  factors and the count of its own stop."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(np.stack([_nonnegative(rng, (8, 16)) for _ in range(3)]))
  batch = nmf.nmf(x, 5)
  alone = [nmf.nmf(m, 5) for m in x]
  assert len({int(f.n_iter) for f in alone}) > 1  # they stop at different iterations
  for i, factors in enumerate(alone):
    assert int(batch.n_iter[i]) == int(factors.n_iter)
    np.testing.assert_allclose(batch.w[i], factors.w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch.h[i], factors.h, rtol=1e-5, atol=1e-5)


def _naive_nmf(x, n, tol=1e-4, max_iter=200):
  """scikit-learn's NMF(n, init='random', random_state=0) of one matrix, written out in
  numpy float32: `_initialize_nmf`, then `_fit_coordinate_descent` with the column loop of
  `_update_cdnmf_fast` (rows vectorized)."""
  rng = np.random.RandomState(0)
  avg = np.sqrt(x.mean() / n)
  h = np.abs(avg * rng.standard_normal((n, x.shape[1])).astype(np.float32))
  w = np.abs(avg * rng.standard_normal((x.shape[0], n)).astype(np.float32))

  def sweep(x, w, ht):
    hht, xht, violation = ht.T @ ht, x @ ht, 0.0
    for t in range(n):
      grad = w @ hht[t] - xht[:, t]
      violation += np.abs(np.where(w[:, t] == 0, np.minimum(grad, 0), grad)).sum()
      if hht[t, t] != 0:
        w[:, t] = np.maximum(w[:, t] - grad / hht[t, t], 0)
    return violation

  ht = h.T.copy()
  for step in range(max_iter):
    violation = sweep(x, w, ht) + sweep(x.T, ht, w)
    if step == 0:
      initial = violation
    if initial == 0 or violation / initial <= tol:
      break
  return w, ht.T


def _head(rng):
  """A global-average-pool + dense head and its dense layer (kernel, bias) in numpy."""
  kernel = rng.normal(size=(K, CLASSES)).astype(np.float32)
  bias = rng.normal(size=CLASSES).astype(np.float32)
  return (lambda a: jnp.mean(a, axis=(1, 2)) @ kernel + bias), kernel, bias


def _naive_dff(features, kernel, bias, n, joint=False):
  """Per image (or the batch as one matrix, `joint`): NaNs to 0, the per-channel minimum
  off, NMF, the concepts' logits by the dense layer, the explanation of the concept of the
  highest softmax probability of the target."""
  a = np.nan_to_num(np.asarray(features, np.float32), nan=0.0)
  groups = [a] if joint else [a[i : i + 1] for i in range(len(a))]
  concepts, explanations, scores, maps = [], [], [], []
  for group in groups:
    x = group.transpose(3, 0, 1, 2).reshape(K, -1)  # (K, images h w)
    offset = x.min(axis=1, keepdims=True)
    w, h = _naive_nmf(x - offset, n)
    logits = (w + offset).T @ kernel + bias  # (n, C)
    for i in range(len(group)):
      concepts.append(w + offset)
      explanations.append(h.reshape(n, len(group), H, W)[:, i])
      scores.append(logits)
  for i, logits in enumerate(scores):
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    maps.append(explanations[i][np.argmax(probs[:, TARGETS[i]])])
  return [np.stack(v) for v in (concepts, explanations, scores, maps)]


@pytest.mark.parametrize('joint', [False, True])
def test_dff_equals_a_numpy_loop(joint, record_property):
  """The factorization, the concept scores and the map of the target's concept, for the
  whole batch at once, against numpy image by image (or of the batch as one matrix)."""
  rng = np.random.default_rng(2)
  features = _nonnegative(rng, (N, H, W, K))
  features[0, 0, 0, 0] = np.nan  # set to 0, as pytorch-grad-cam does
  features[1] -= 0.5  # negative activations: the offset makes them non-negative
  head_fn, kernel, bias = _head(rng)
  t = jnp.asarray(TARGETS)
  ours = jax.jit(cam.deep_feature_factorization, static_argnums=(1, 2), static_argnames='joint')(
    jnp.asarray(features), 5, head_fn, joint=joint
  )
  maps = cam.dff_cam(head_fn, jnp.asarray(features), t, 5, joint)
  naive = _naive_dff(features, kernel, bias, 5, joint)
  got = (ours.concepts, ours.explanations, ours.scores, maps)
  difference = relative_difference(got, naive)
  record_property('max_rel_difference', difference)
  print(f'DFF (joint={joint}) against numpy: {difference:.1e}')
  assert difference < NMF_RTOL
  assert ours.n_iter.shape == ((1,) if joint else (N,))
  assert (np.asarray(maps) >= 0).all() and maps.shape == (N, H, W)


def test_dff_through_the_explainer():
  """By name under jit: the raw maps are `cam.dff_cam` of the layer, the maps at image size
  in [0, 1]; `factorization` gives every concept; callable targets are refused."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(K, (3, 3), strides=2, name='conv')(x))
      return nn.Dense(CLASSES)(x.mean((1, 2)))

  pixels = jax.random.uniform(jax.random.key(0), (N, 10, 10, 3))
  net = Net()
  variables = net.init(jax.random.key(1), pixels)
  explainer = explain.Explainer(net, mean=0.5, std=0.25, layer='conv', dff_components=3)
  t = jnp.asarray(TARGETS)
  maps = jax.jit(explainer.maps, static_argnums=0)(
    'deep_feature_factorization', variables, pixels, t
  )
  assert maps.shape == (N, 10, 10) and (maps.max(axis=(1, 2)) > 0.99).all()
  assert float(maps.min()) >= 0 and float(maps.max()) <= 1 + 1e-6
  features, head_fn = explainer.features(variables, pixels)
  raw = explainer.raw_maps('deep_feature_factorization', variables, pixels, t)
  np.testing.assert_allclose(raw, cam.dff_cam(head_fn, features, t, 3), rtol=1e-5, atol=1e-5)
  full = explainer.factorization(variables, pixels, n_components=3)
  assert full.concepts.shape == (N, K, 3) and full.explanations.shape == (N, 3, 5, 5)
  assert full.scores.shape == (N, 3, CLASSES)
  with pytest.raises(ValueError, match='explains class indices'):
    explainer.maps('deep_feature_factorization', variables, pixels, lambda logits: logits[:, 0])


def test_dff_equals_pytorch_grad_cam(record_property):
  """pytorch-grad-cam's DeepFeatureFactorization with `computation_on_concepts` the twin's
  dense layer: per image (a batch of one) against ours, and on the whole batch (one NMF of
  the batch) against `joint=True`. Its explanations are each min-max scaled
  (`scale_cam_image`) and resized to the image by cv2's bilinear resize; ours the same
  through `upsample_cam`."""
  pytest.importorskip('torch')
  pytest.importorskip('pytorch_grad_cam')
  pytest.importorskip('sklearn')
  from pytorch_grad_cam import DeepFeatureFactorization

  from tests.test_pytorch_grad_cam import SIZE, _problem, _scale

  _, features, head_fn, _, torch_model, x = _problem(curved=False)[:6]
  n = cam.DFF_COMPONENTS
  dff = DeepFeatureFactorization(
    torch_model, torch_model.relu2, computation_on_concepts=torch_model.fc
  )
  factors, maps = 0.0, 0.0
  for joint, batches in ((False, [x[i : i + 1] for i in range(N)]), (True, [x])):
    ours = cam.deep_feature_factorization(features, n, head_fn, joint=joint)
    with warnings.catch_warnings():  # scikit-learn's ConvergenceWarning at max_iter
      warnings.simplefilter('ignore')
      theirs = [dff(batch, n) for batch in batches]
    per_batch = len(batches[0])
    concepts = np.stack([c for c, _, _ in theirs for _ in range(per_batch)])
    scores = np.stack([s for _, _, s in theirs for _ in range(per_batch)])
    explanations = np.concatenate([np.stack(e) for _, e, _ in theirs])
    scaled = _scale(np.asarray(ours.explanations).reshape(N * n, H, W))
    upsampled = np.asarray(cam.upsample_cam(jnp.asarray(scaled), SIZE))
    mode_factors = max(
      relative_difference(ours.concepts, concepts), relative_difference(ours.scores, scores)
    )
    mode_maps = float(np.abs(upsampled.reshape(explanations.shape) - explanations).max())
    print(f'DFF (joint={joint}) against pytorch-grad-cam: {mode_factors:.1e}, maps {mode_maps:.1e}')
    factors, maps = max(factors, mode_factors), max(maps, mode_maps)
  dff.activations_and_grads.release()
  record_property('max_rel_difference', factors)
  record_property('max_abs_map_difference', maps)
  assert factors < NMF_RTOL
  assert maps < MAP_TOLERANCE
