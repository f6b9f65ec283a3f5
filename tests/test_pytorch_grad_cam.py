"""Our CAM methods against pytorch-grad-cam's own API on a tiny CNN with identical weights.

The Flax CNN and its PyTorch twin share every weight (HWIO -> OIHW kernels, NHWC -> NCHW
images). pytorch-grad-cam returns, per image, the map ReLU'd, min-max scaled as
`scale_cam_image` (`m - min`, `/ (1e-7 + max)`), resized to the image by cv2's half-pixel
bilinear INTER_LINEAR, and scaled again; `_as_pytorch_grad_cam` does the same to our maps,
with `upsample_cam` for the resize. Both sides are float32, so the maps agree to ~1e-6;
where pytorch-grad-cam's method itself differs, the test patches that one step with
pytorch-grad-cam's or PyTorch's own function and says why.
"""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcam_jax import cam, explain
from bcam_jax.explain import sess

torch = pytest.importorskip('torch')
pytorch_grad_cam = pytest.importorskip('pytorch_grad_cam')
from pytorch_grad_cam import eigen_cam as pgc_eigen_cam  # noqa: E402
from pytorch_grad_cam import eigen_grad_cam as pgc_eigen_grad_cam  # noqa: E402
from pytorch_grad_cam import score_cam as pgc_score_cam  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import (  # noqa: E402
  get_2d_projection_with_sign_correction,
)

SIZE, CLASSES = 10, 4
TARGETS = np.array([0, 3, 1, 2])
# float32 on both sides, maps scaled to [0, 1]: rounding in different summation orders.
TOLERANCE = 1e-5
# pytorch-grad-cam's ScoreCAM upsamples its masks with align_corners=True, we half-pixel:
# other masks, other weights, maps 7.7e-3 apart here.
SCORE_CAM_ALIGN_CORNERS_TOLERANCE = 0.05


class TinyCnn(nn.Module):
  """Conv 3x3 8 ch, ReLU, Conv 3x3 stride 2 6 ch, ReLU (the CAM layer, 5x5), GAP, Dense;
  with `curved`, a tanh before the pooling, so the head is not linear in the CAM layer
  (ShapleyCAM's Hessian term is then not zero)."""

  curved: bool = False

  def setup(self):
    self.conv1 = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)))
    self.conv2 = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)))
    self.dense = nn.Dense(CLASSES)

  def features(self, x):
    return nn.relu(self.conv2(nn.relu(self.conv1(x))))

  def head(self, a):
    return self.dense(jnp.mean(jnp.tanh(a) if self.curved else a, axis=(1, 2)))

  def __call__(self, x):
    return self.head(self.features(x))


class TorchTinyCnn(torch.nn.Module):
  """TinyCnn in PyTorch; `relu2` is the target layer."""

  def __init__(self, params, curved=False):
    super().__init__()
    self.curved = curved
    self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
    self.relu1 = torch.nn.ReLU()
    self.conv2 = torch.nn.Conv2d(8, 6, 3, stride=2, padding=1)
    self.relu2 = torch.nn.ReLU()
    self.fc = torch.nn.Linear(6, CLASSES)
    tensor = lambda x: torch.tensor(np.array(x))
    with torch.no_grad():
      for name in ('conv1', 'conv2'):
        kernel = np.array(params[name]['kernel']).transpose(3, 2, 0, 1)  # HWIO -> OIHW
        getattr(self, name).weight.copy_(tensor(kernel))
        getattr(self, name).bias.copy_(tensor(params[name]['bias']))
      self.fc.weight.copy_(tensor(np.array(params['dense']['kernel']).T))
      self.fc.bias.copy_(tensor(params['dense']['bias']))

  def forward(self, x):
    a = self.relu2(self.conv2(self.relu1(self.conv1(x))))
    return self.fc((torch.tanh(a) if self.curved else a).mean(dim=(2, 3)))


def _problem(curved):
  model = TinyCnn(curved=curved)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(4, SIZE, SIZE, 3)), jnp.float32)
  shapes = {'conv1': (3, 3, 3, 8), 'conv2': (3, 3, 8, 6), 'dense': (6, CLASSES)}
  variables = {  # drawn in numpy: `model.init` would cost a compilation
    'params': {
      name: {
        'kernel': jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), jnp.float32),
        'bias': jnp.asarray(0.1 * rng.normal(size=shape[-1]), jnp.float32),
      }
      for name, shape in shapes.items()
    }
  }
  torch_model = TorchTinyCnn(variables['params'], curved).eval()
  x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())  # NHWC -> NCHW
  with torch.no_grad():
    np.testing.assert_allclose(torch_model(x).numpy(), model.apply(variables, images), atol=1e-5)
  features = model.apply(variables, images, method='features')
  head_fn = lambda a: model.apply(variables, a, method='head')
  logits_fn = lambda x: model.apply(variables, x)
  return images, features, head_fn, logits_fn, torch_model, x, model, variables


@pytest.fixture(scope='module')
def problem():
  return _problem(curved=False)


@pytest.fixture(scope='module')
def curved_problem():
  return _problem(curved=True)


def _scale(maps):
  """pytorch-grad-cam's `scale_cam_image` without the resize."""
  maps = maps - maps.min(axis=(1, 2), keepdims=True)
  return maps / (1e-7 + maps.max(axis=(1, 2), keepdims=True))


def _as_pytorch_grad_cam(maps):
  """Our maps `(N, h, w)` post-processed as pytorch-grad-cam's `BaseCAM.forward`."""
  scaled = _scale(np.maximum(np.asarray(maps, np.float32), 0))
  return _scale(np.maximum(np.asarray(cam.upsample_cam(jnp.asarray(scaled), SIZE)), 0))


def _theirs(method, torch_model, x, **kwargs):
  targets = [ClassifierOutputTarget(int(c)) for c in TARGETS]
  with method(model=torch_model, target_layers=[torch_model.relu2], **kwargs) as explainer:
    return explainer(input_tensor=x, targets=targets)


def _ours(name, images, features, head_fn, logits_fn):
  t = jnp.asarray(TARGETS)
  if name in CLASS_AGNOSTIC:
    return CLASS_AGNOSTIC[name](features)
  if name == 'ScoreCAM':
    return cam.score_cam(logits_fn, images, features, t, channel_softmax=True)
  ours = {
    'GradCAM': cam.grad_cam,
    'GradCAMPlusPlus': cam.grad_cam_pp,
    'XGradCAM': cam.xgrad_cam,
    'HiResCAM': cam.hires_cam,
    'LayerCAM': cam.layer_cam,
    'AblationCAM': cam.ablation_cam,
    'GradCAMElementWise': cam.grad_cam_elementwise,
    'EigenGradCAM': cam.eigen_grad_cam,
    'SegEigenCAM': cam.seg_eigen_cam,
    'ShapleyCAM': cam.shapley_cam,
  }[name]
  return ours(head_fn, features, t)


def _half_pixel_upsampling(size):
  """`torch.nn.UpsamplingBilinear2d` (align_corners=True) replaced by half-pixel bilinear."""
  return lambda x: torch.nn.functional.interpolate(x, size, mode='bilinear', align_corners=False)


CLASS_AGNOSTIC = {'EigenCAM': cam.eigen_cam, 'KPCA_CAM': cam.kpca_cam, 'FEM': cam.fem}
METHODS = (
  'GradCAMElementWise',
  'EigenGradCAM',
  'SegEigenCAM',
  'KPCA_CAM',
  'FEM',
  'ShapleyCAM',
  'GradCAM',
  'GradCAMPlusPlus',
  'XGradCAM',
  'HiResCAM',
  'LayerCAM',
  'EigenCAM',
  'AblationCAM',
  'ScoreCAM',
)


def _compare(name, ours, theirs, record_property):
  assert theirs.shape == ours.shape == (4, SIZE, SIZE)
  difference = float(np.abs(ours - theirs).max())
  record_property('max_abs_difference', difference)
  print(f'{name}: max abs difference {difference:.2e}')
  assert difference < TOLERANCE
  assert (ours.max(axis=(1, 2)) > 0.99).all()
  return difference


@pytest.mark.parametrize('name', METHODS)
def test_maps_equal_pytorch_grad_cam(name, problem, monkeypatch, record_property):
  images, features, head_fn, logits_fn, torch_model, x = problem[:6]
  if name == 'AblationCAM':  # pytorch-grad-cam zeroes a channel where the image's min is 0
    assert (features.min(axis=(1, 2, 3)) == 0).all()
  if name == 'EigenCAM':  # its EigenCAM leaves the sign to LAPACK; ours is its corrected one
    monkeypatch.setattr(pgc_eigen_cam, 'get_2d_projection', get_2d_projection_with_sign_correction)
  if name == 'EigenGradCAM':  # the same for the projection of G * A
    monkeypatch.setattr(
      pgc_eigen_grad_cam, 'get_2d_projection', get_2d_projection_with_sign_correction
    )
  if name == 'ScoreCAM':  # see test_score_cam_gap_is_its_align_corners_mask_upsampling
    monkeypatch.setattr(pgc_score_cam.torch.nn, 'UpsamplingBilinear2d', _half_pixel_upsampling)
  ours = _as_pytorch_grad_cam(_ours(name, images, features, head_fn, logits_fn))
  _compare(name, ours, _theirs(getattr(pytorch_grad_cam, name), torch_model, x), record_property)


def test_score_cam_gap_is_its_align_corners_mask_upsampling(problem, record_property):
  """Unpatched, pytorch-grad-cam's ScoreCAM masks with align_corners=True bilinear upsampling
  (`torch.nn.UpsamplingBilinear2d`), which samples the feature map at other points than our
  half-pixel `upsample_cam`: different masks, weights and maps. The test above patches that
  one layer; here the gap without the patch is bounded and recorded."""
  images, features, head_fn, logits_fn, torch_model, x = problem[:6]
  ours = _as_pytorch_grad_cam(_ours('ScoreCAM', images, features, head_fn, logits_fn))
  theirs = _theirs(pytorch_grad_cam.ScoreCAM, torch_model, x)
  difference = float(np.abs(ours - theirs).max())
  record_property('max_abs_difference', difference)
  print(f'ScoreCAM (align_corners masks): max abs difference {difference:.2e}')
  assert TOLERANCE < difference < SCORE_CAM_ALIGN_CORNERS_TOLERANCE


def test_unpatched_eigen_cam_differs_at_most_by_the_sign(problem, record_property):
  """pytorch-grad-cam's EigenCAM keeps whatever sign LAPACK gives the singular vector: per
  image, its map is ours (the sign-corrected projection p) or that of -p."""
  images, features, head_fn, logits_fn, torch_model, x = problem[:6]
  ours = _as_pytorch_grad_cam(cam.eigen_cam(features))
  activations = np.array(features).transpose(0, 3, 1, 2)
  flipped = _as_pytorch_grad_cam(-get_2d_projection_with_sign_correction(activations))
  theirs = _theirs(pytorch_grad_cam.EigenCAM, torch_model, x)
  per_image = np.minimum(
    np.abs(ours - theirs).max(axis=(1, 2)), np.abs(flipped - theirs).max(axis=(1, 2))
  )
  difference = float(np.abs(ours - theirs).max())
  record_property('max_abs_difference', difference)
  print(f'EigenCAM (LAPACK sign): max abs difference {difference:.2e}')
  assert (per_image < TOLERANCE).all()


def test_shapley_cam_equals_theirs_where_the_hessian_term_counts(curved_problem, record_property):
  """With a tanh in the head, H A is not zero: ShapleyCAM differs from Grad-CAM, and ours
  equals pytorch-grad-cam's Hessian-vector product through torch.autograd."""
  images, features, head_fn, logits_fn, torch_model, x = curved_problem[:6]
  t = jnp.asarray(TARGETS)
  ours = _as_pytorch_grad_cam(cam.shapley_cam(head_fn, features, t))
  grad = _as_pytorch_grad_cam(cam.grad_cam(head_fn, features, t))
  assert np.abs(ours - grad).max() > 1e-2
  _compare(
    'ShapleyCAM (tanh head)',
    ours,
    _theirs(pytorch_grad_cam.ShapleyCAM, torch_model, x),
    record_property,
  )


@pytest.mark.parametrize('alpha', [1.0, 0.6])
def test_finer_cam_equals_theirs(alpha, curved_problem, record_property):
  """pytorch-grad-cam's FinerCAM with its default targets: the predicted class against the
  three classes whose logits are nearest to it."""
  images, features, head_fn, logits_fn, torch_model, x = curved_problem[:6]
  predicted = jnp.argmax(logits_fn(images), axis=-1)
  ours = _as_pytorch_grad_cam(cam.finer_cam(head_fn, features, predicted, alpha=alpha))
  grad = _as_pytorch_grad_cam(cam.grad_cam(head_fn, features, predicted))
  assert np.abs(ours - grad).max() > 1e-2  # the comparison classes change the map
  finer = pytorch_grad_cam.FinerCAM(torch_model, [torch_model.relu2])
  theirs = finer(x, alpha=alpha)
  _compare(f'FinerCAM (alpha {alpha})', ours, theirs, record_property)


def test_refine_cam_equals_theirs(problem, record_property):
  """RefineCAM over conv1 (10x10) and conv2 (5x5, before their ReLUs) with its default
  Grad-CAM++: ours is the explainer's `fusion='product'` over the same two layers."""
  images, _, _, _, torch_model, x, model, variables = problem
  explainer = explain.Explainer(model, layer=['conv1', 'conv2'], fusion='product')
  ours = np.asarray(explainer.maps('grad_cam_pp', variables, images, jnp.asarray(TARGETS)))
  targets = [ClassifierOutputTarget(int(c)) for c in TARGETS]
  refine = pytorch_grad_cam.RefineCAM(torch_model, [torch_model.conv1, torch_model.conv2])
  theirs = refine(x, targets)
  _compare('RefineCAM', ours, theirs, record_property)


def test_guided_backprop_equals_theirs(problem, record_property):
  """pytorch-grad-cam's GuidedBackpropReLUModel, one image at a time, against the whole
  batch's guided gradients: the model's ReLUs are swapped while it is traced."""
  from pytorch_grad_cam import GuidedBackpropReLUModel

  images, _, _, _, torch_model, x, model, variables = problem
  explainer = explain.Explainer(model, layer='conv2')
  ours = np.asarray(explainer.guided_gradients(variables, images, jnp.asarray(TARGETS)))
  # A copy: it puts one ReLU module back in place of all of the model's ReLUs afterwards,
  # after which a hook on relu2 would also see relu1's outputs (the twin is shared).
  guided = GuidedBackpropReLUModel(copy.deepcopy(torch_model), device='cpu')
  theirs = np.stack([guided(x[i : i + 1], int(c)) for i, c in enumerate(TARGETS)])
  assert ours.shape == theirs.shape == (4, SIZE, SIZE, 3)
  scale = float(np.abs(theirs).max())
  difference = float(np.abs(ours - theirs).max()) / scale
  record_property('max_abs_difference', difference)
  print(f'guided backprop: max difference / max |gradient| {difference:.2e}')
  assert difference < TOLERANCE
  plain = np.asarray(jax.grad(lambda p: model.apply(variables, p)[:, 0].sum())(images))
  assert np.abs(plain[:1] - ours[:1]).max() > 1e-3 * scale  # the guiding changes them


def test_full_grad_equals_theirs(problem, record_property):
  """pytorch-grad-cam's FullGrad (the biases of conv1 and conv2, no BatchNorm here;
  tests/test_fullgrad.py has one) against the explainer's `full_grad`."""
  images, _, _, _, torch_model, x, model, variables = problem
  ours = explain.Explainer(model).maps('full_grad', variables, images, jnp.asarray(TARGETS))
  targets = [ClassifierOutputTarget(int(c)) for c in TARGETS]
  with pytorch_grad_cam.FullGrad(torch_model, []) as full_grad:
    theirs = full_grad(input_tensor=x, targets=targets)
  _compare('FullGrad', np.asarray(ours), theirs, record_property)


@pytest.mark.parametrize(
  'options',
  [
    {},  # its defaults: 12 scales from the window (10, 13, ..., 43), no overlap, mean fusion
    {'pool': 'max', 'pre_filter_ratio': 0.5, 'theta': 0.2, 'smooth': False},
    {'scales': [10, 15], 'window_size': 9, 'step_size': 3, 'use_softmax_scores': False},
  ],
)
def test_sess_equals_theirs(options, problem, record_property):
  """pytorch-grad-cam's SESS with its Grad-CAM base against `sess.sess` on the same base,
  square and (the last case) 10x13 images with overlapping windows."""
  images, _, _, _, torch_model, x, model, variables = problem
  if 'window_size' in options:
    images = jnp.asarray(np.random.default_rng(1).normal(size=(4, SIZE, 13, 3)), jnp.float32)
    x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())

  def patch_fn(patches, targets):
    features = model.apply(variables, patches, method='features')
    head_fn = lambda a: model.apply(variables, a, method='head')
    return cam.grad_cam(head_fn, features, targets), model.apply(variables, patches)

  ours = cam.normalize_cam(sess.sess(patch_fn, images, jnp.asarray(TARGETS), **options))
  targets = [ClassifierOutputTarget(int(c)) for c in TARGETS]
  with pytorch_grad_cam.SESS(torch_model, [torch_model.relu2], **options) as theirs_sess:
    theirs = theirs_sess(input_tensor=x, targets=targets)
  assert theirs.shape == ours.shape == images.shape[:3]
  difference = float(np.abs(np.asarray(ours) - theirs).max())
  record_property('max_abs_difference', difference)
  print(f'SESS {options}: max abs difference {difference:.2e}')
  assert difference < TOLERANCE
