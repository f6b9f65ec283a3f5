"""Train-time augmentation (`data.augment`) against naive numpy references: the crop boxes,
cut-and-resize, flips, off = the plain preprocessing, determinism, and its config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcam_jax import config_validation, data
from bcam_jax.configs import base
from bcam_jax.data import augment

CROP = data.AugmentOptions(random_resized_crop=True)
FLIP = data.AugmentOptions(horizontal_flip=True)
# Jitted, as in the train step (one compilation instead of one per operation).
augment_pixels = jax.jit(data.augment_pixels, static_argnums=(2, 3))
crop_boxes = jax.jit(augment.crop_boxes, static_argnums=(1, 2, 3, 4, 5))


def images(n=6, size=10, channels=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), np.uint8)


def numpy_cut_and_resize(image: np.ndarray, box, size: int) -> np.ndarray:
  """Cut the box out, then resize it bilinearly (half-pixel centres, edge pixels repeated),
  pixel by pixel: the reference for boxes no larger than `size` (no antialiasing)."""
  top, left, h, w = (int(v) for v in box)
  cut = image[top : top + h, left : left + w].astype(np.float64) / 255
  out = np.empty((size, size, image.shape[2]))
  for i in range(size):
    y = min(max((i + 0.5) * h / size - 0.5, 0.0), h - 1)
    y0 = int(np.floor(y))
    y1, fy = min(y0 + 1, h - 1), y - y0
    for j in range(size):
      x = min(max((j + 0.5) * w / size - 0.5, 0.0), w - 1)
      x0 = int(np.floor(x))
      x1, fx = min(x0 + 1, w - 1), x - x0
      top_row = cut[y0, x0] * (1 - fx) + cut[y0, x1] * fx
      bottom_row = cut[y1, x0] * (1 - fx) + cut[y1, x1] * fx
      out[i, j] = top_row * (1 - fy) + bottom_row * fy
  return out


def test_random_resized_crop_is_the_cut_box_resized():
  x = images(n=8, size=10)

  @jax.jit
  def boxes_and_crops(x, key):  # the boxes augment_pixels draws (from its first subkey)
    boxes = augment.crop_boxes(jax.random.split(key)[0], 8, 10, 10, CROP.scale, CROP.ratio)
    return boxes, data.augment_pixels(x, key, 16, CROP)  # 16 >= every box: upsampling

  boxes, out = jax.device_get(boxes_and_crops(x, jax.random.key(3)))
  assert out.shape == (8, 16, 16, 3) and out.dtype == np.float32
  assert len({tuple(b) for b in boxes}) > 1  # each image draws its own box
  for i in range(8):
    np.testing.assert_allclose(out[i], numpy_cut_and_resize(x[i], boxes[i], 16), atol=2e-6)


def test_crop_boxes_fit_and_follow_the_ranges():
  boxes = np.asarray(crop_boxes(jax.random.key(0), 500, 32, 24, (0.2, 0.6), (0.5, 2.0)))
  top, left, h, w = boxes.T
  assert (h >= 1).all() and (w >= 1).all()
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= 32).all() and (left + w <= 24).all()
  area = h * w / (32 * 24)  # sides are rounded: allow a pixel either way
  assert (area > 0.2 * 0.8).all() and (area < 0.6 * 1.25).all()
  aspect = w / h
  assert (aspect > 0.5 * 0.8).all() and (aspect < 2.0 * 1.25).all()
  assert top.min() == 0 and (top + h).max() == 32  # offsets reach both edges


def test_crop_falls_back_to_the_ratio_clipped_centre():
  # No box of ratio 4..5 and area >= 0.99 fits a square: the centre crop, 20 / 4 high,
  # at (20 - 5) // 2 as torchvision puts it.
  boxes = np.asarray(crop_boxes(jax.random.key(1), 5, 20, 20, (0.99, 1.0), (4.0, 5.0)))
  np.testing.assert_array_equal(boxes, np.tile([[7, 0, 5, 20]], (5, 1)))


def test_whole_image_box_is_the_plain_resize():
  x = images(n=3, size=12)
  whole = data.AugmentOptions(random_resized_crop=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  key = jax.random.key(0)
  same = augment_pixels(x, key, 12, whole)
  np.testing.assert_allclose(same, x / np.float32(255), atol=1e-6)  # the identity
  # Shrinking: the antialiased bilinear of `to_pixels`.
  np.testing.assert_allclose(augment_pixels(x, key, 5, whole), data.to_pixels(x, 5), atol=1e-6)


def test_flip_mirrors_about_half_the_images():
  x = images(n=64, size=6, channels=1)
  out = np.asarray(augment_pixels(x, jax.random.key(5), 6, FLIP))
  pixels = x / np.float32(255)
  flipped = [np.allclose(o, p[:, ::-1], rtol=0, atol=1e-6) for o, p in zip(out, pixels)]
  kept = [np.allclose(o, p, rtol=0, atol=1e-6) for o, p in zip(out, pixels)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert 16 < sum(flipped) < 48


def test_off_is_the_plain_preprocessing_and_on_is_deterministic():
  x = images()
  assert not data.AugmentOptions().enabled
  np.testing.assert_array_equal(
    augment_pixels(x, jax.random.key(0), 14, data.AugmentOptions()), data.to_pixels(x, 14)
  )
  both = data.AugmentOptions(random_resized_crop=True, horizontal_flip=True)
  run = jax.jit(lambda x, key: augment_pixels(x, key, 14, both))
  a, b = run(x, jax.random.key(7)), run(x, jax.random.key(7))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, run(x, jax.random.key(8)))


def test_options_come_from_the_config():
  config = base.get_base_config()
  assert data.AugmentOptions.from_config(config.data) == data.AugmentOptions()
  config.data.augment.horizontal_flip = True
  config.data.augment.scale = (0.25, 1.0)
  options = data.AugmentOptions.from_config(config.data)
  assert options.horizontal_flip and options.scale == (0.25, 1.0) and options.enabled
  del config.data['augment']  # a config written before augmentation existed: completed
  completed = config_validation.complete(config)
  assert data.AugmentOptions.from_config(completed.data) == data.AugmentOptions()


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('scale', (0.5, 2.0), r'augment.scale=\(0.5, 2.0\); expected \(low, high\) with 0 < low'),
    ('scale', (0.0, 1.0), r'augment.scale=\(0.0, 1.0\)'),
    ('ratio', (2.0, 1.0), r'augment.ratio=\(2.0, 1.0\); expected \(low, high\)'),
    ('ratio', (1.0,), r'augment.ratio=\(1.0,\); expected a pair'),
    ('horizontal_flip', 1, r'augment.horizontal_flip=1; expected True or False'),
  ],
)
def test_bad_augment_fields_fail_naming_them(field, value, message):
  config = base.get_base_config()
  if field == 'horizontal_flip':
    config.data.augment = dict(config.data.augment.to_dict(), horizontal_flip=value)
  else:
    config.data.augment[field] = value
  with pytest.raises(config_validation.ConfigError, match=message):
    config_validation.validate_config(config)


def test_the_train_step_augments_with_a_key_of_the_step():
  """The step's augmentation depends only on (seed, step), and changes with the step."""
  from bcam_jax import models, objective, optim, steps

  model = models.get_model('simple_cnn', 3)
  tx, schedule = optim.make_optimizer(base.get_base_config().optimizer, 10)
  loss = objective.Objective(kind='ce', num_classes=3, prototype_size=8)
  kwargs = dict(mean=0.5, std=0.25, dtype=jnp.float32, image_size=8, seed=0)
  state = jax.jit(steps.make_init_fn(model, tx, 0, 8, 3))()
  x, labels, protos = images(n=4, size=8), jnp.arange(4) % 3, jnp.zeros((3, 8, 8))
  both = data.AugmentOptions(random_resized_crop=True, horizontal_flip=True)
  augmented = jax.jit(steps.make_train_step(model, tx, schedule, loss, augment=both, **kwargs))
  first = float(augmented(state, x, labels, protos)[1]['loss'])
  assert float(augmented(state, x, labels, protos)[1]['loss']) == first
  later = float(
    augmented(state.replace(step=jnp.ones_like(state.step)), x, labels, protos)[1]['loss']
  )
  # simple_cnn has no dropout and its loss is computed before the update: only the
  # augmentation of another step can change it.
  assert later != first
