"""SESS (explain.sess) against a per-image loop that pastes every patch map into a canvas,
resizes with a per-pixel bilinear sampler and blurs with scipy; the resize matrices and
the blur on their own; the options it refuses. tests/test_pytorch_grad_cam.py compares
it with pytorch-grad-cam's SESS on identical weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from bcam_jax import explain
from bcam_jax.explain import sess

SIZE, CLASSES = 10, 4
TARGETS = jnp.array([0, 3, 1])


class Cnn(nn.Module):
  """Conv 3x3 8 ch, ReLU, Conv 3x3 stride 2 6 ch (the explained layer, 5x5), ReLU, GAP,
  Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), padding=1, name='conv1')(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding=1, name='conv2')(x))
    return nn.Dense(CLASSES, name='dense')(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope='module')
def problem():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=(3, SIZE, SIZE, 3)), jnp.float32)
  model = Cnn()
  variables = model.init(jax.random.key(0), images)
  variables = {'params': variables['params']}
  return explain.Explainer(model, layer='conv2'), variables, images


def _bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Half-pixel bilinear sampling, source coordinates clamped to the edge, one pixel at a
  time: `(h, w, ...)` -> `(height, width, ...)`."""
  h, w = image.shape[:2]

  def source(i, n_in, n_out):
    x = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
    x0 = int(np.floor(x))
    return x0, min(x0 + 1, n_in - 1), x - x0

  out = np.zeros((height, width) + image.shape[2:])
  for i in range(height):
    y0, y1, fy = source(i, h, height)
    for j in range(width):
      x0, x1, fx = source(j, w, width)
      top = (1 - fx) * image[y0, x0] + fx * image[y0, x1]
      bottom = (1 - fx) * image[y1, x0] + fx * image[y1, x1]
      out[i, j] = (1 - fy) * top + fy * bottom
  return out


def _starts(length, step, window):
  """The windows' starts along a side: every step while the window fits short of the end,
  then one flush with the end."""
  return [s for s in range(0, length, step) if s + window < length] + [max(length - window, 0)]


def naive_sess(explainer, variables, images, targets, sides, step, theta, pool, ratio):
  """SESS one image, one patch at a time, as the paper describes it."""
  logits = jax.jit(lambda p: explainer.logits(variables, p))
  grad_cam = jax.jit(lambda p, t: explainer.maps('grad_cam', variables, p, t))
  out = []
  for image, target in zip(np.asarray(images, np.float64), np.asarray(targets), strict=True):
    window = image.shape[0]
    patches = []
    for side in sides:
      scaled = _bilinear(image, side, side)
      for y in _starts(side, step, window):
        for x in _starts(side, step, window):
          patches.append((scaled[y : y + window, x : x + window], y, x, side))
    scores = []
    for patch, *_ in patches:
      probs = np.asarray(jax.nn.softmax(logits(jnp.asarray(patch[None], jnp.float32))[0]))
      scores.append(max(float(probs[target]), 0.0))
    scores = np.array(scores)
    order = np.argsort(scores, kind='stable')[int(len(scores) * ratio) :]
    total, counts = np.zeros((window, window)), np.zeros((window, window))
    for i in order:
      patch, y, x, side = patches[i]
      cam = np.asarray(grad_cam(jnp.asarray(patch[None], jnp.float32), jnp.array([target]))[0])
      canvas = np.zeros((side, side))
      canvas[y : y + window, x : x + window] = cam * scores[i] / scores.max()
      pasted = _bilinear(canvas, window, window)
      if pool == 'max':
        total = np.maximum(total, pasted)
      else:
        total += np.where(pasted > theta, pasted, 0)
        counts += pasted > theta
    fused = total if pool == 'max' else np.where(counts > 0, total / np.maximum(counts, 1), 0)
    blurred = ndimage.gaussian_filter(fused, 5.0, mode='mirror', truncate=1.0)  # 11x11
    out.append((blurred - blurred.min()) / (blurred.max() - blurred.min()))
  return np.stack(out)


@pytest.mark.parametrize(
  'options',
  [
    {'pool': 'mean', 'theta': 0.0, 'step': SIZE, 'ratio': 0.0},
    {'pool': 'mean', 'theta': 0.15, 'step': 4, 'ratio': 0.3},
    {'pool': 'max', 'theta': 0.0, 'step': 6, 'ratio': 0.0},
  ],
)
def test_sess_equals_per_image_loop(problem, options):
  explainer, variables, images = problem
  sides = [SIZE, 13, 17]
  got = jax.jit(
    lambda v, p, t: explainer.sess(
      v,
      p,
      t,
      scales=sides,
      step_size=options['step'],
      theta=options['theta'],
      pool=options['pool'],
      pre_filter_ratio=options['ratio'],
      chunk=5,  # several chunks per scale, the last one padded
    )
  )(variables, images, TARGETS)
  want = naive_sess(explainer, variables, images, TARGETS, sides, **options)
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert got.shape == images.shape[:3]


def test_sess_method_is_the_default_sess_of_grad_cam(problem):
  """`maps('sess')`: pytorch-grad-cam's defaults, 12 scales from the window, 10 to 43."""
  explainer, variables, images = problem
  assert sess.default_scales(SIZE) == [10 + 3 * i for i in range(12)]
  assert (
    sess.default_scales(224)[:3] == [224, 288, 352] and sess.default_scales(224)[-1] == 928
  )  # the paper's
  both = jax.jit(
    lambda v, p, t: (explainer.maps('sess', v, p, t), explainer.sess(v, p, t, chunk=7))
  )
  got, want = both(variables, images, TARGETS)
  # chunks of 64 and of 7 windows: other batch shapes, other float32 rounding (1.3e-6 seen)
  np.testing.assert_allclose(got, want, atol=1e-5)
  sides = [SIZE, 13]
  grad_cam = explainer.sess(variables, images, TARGETS, scales=sides)
  layer_cam = explainer.sess(variables, images, TARGETS, base='layer_cam', scales=sides)
  assert float(jnp.abs(layer_cam - grad_cam).max()) > 1e-3


def test_resize_matrix_and_blur_are_opencvs_rules():
  """Against the per-pixel sampler (down, up, 2x) and scipy's reflect-101 Gaussian."""
  rng = np.random.default_rng(3)
  image = rng.normal(size=(12, 12))
  for n_out in (5, 6, 12, 19):
    matrix = sess.linear_resize_matrix(12, n_out)
    np.testing.assert_allclose(matrix @ image @ matrix.T, _bilinear(image, n_out, n_out))
    np.testing.assert_allclose(matrix.sum(1), 1)
  blurred = sess.gaussian_blur(jnp.asarray(image[None], jnp.float32))[0]
  want = ndimage.gaussian_filter(image, 5.0, mode='mirror', truncate=1.0)
  np.testing.assert_allclose(blurred, want, atol=1e-6)


@pytest.mark.parametrize(
  ('kwargs', 'message'),
  [
    ({'base': 'sess'}, 'sess needs another method as its base'),
    ({'base': 'gradcam'}, r"unknown CAM method\(s\) \['gradcam'\]"),
    ({'pool': 'median'}, "pool='median'; expected one of mean, max"),
    ({'pre_filter_ratio': 1.0}, r'pre_filter_ratio=1.0; expected a value in \[0, 1\)'),
    ({'scales': [8, 12]}, r'scales=\[8, 12\]; expected sides of at least the window'),
  ],
)
def test_sess_refuses(problem, kwargs, message):
  explainer, variables, images = problem
  with pytest.raises(ValueError, match=message):
    explainer.sess(variables, images, TARGETS, **kwargs)


def test_sess_refuses_a_callable_target(problem):
  explainer, variables, images = problem
  with pytest.raises(ValueError, match='sess explains class indices'):
    explainer.sess(variables, images, lambda logits: logits[0])
