"""Faithfulness metrics on hand-built cases with known answers and against naive loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcam_jax.explain import faithfulness

S = 6  # image side


def test_drop_gain_increase_hand_computed():
  y = jnp.array([0.8, 0.5, 1.0, 0.3, 0.0, 0.4])
  o = jnp.array([0.4, 0.75, 1.0, 0.3, 0.2, 0.1])
  got = jax.device_get(faithfulness.drop_gain_increase(y, o))
  np.testing.assert_allclose(got['average_drop'], [50, 0, 0, 0, 0, 75], atol=1e-4)
  np.testing.assert_allclose(got['average_gain'], [0, 50, 0, 0, 20, 0], atol=1e-4)
  np.testing.assert_array_equal(got['average_increase'], [0, 100, 0, 0, 100, 0])
  assert all(np.isfinite(v).all() for v in got.values())  # Y = 1 and Y = 0 give no NaN


def test_trapezoid_auc():
  np.testing.assert_allclose(faithfulness.trapezoid_auc(jnp.linspace(0, 1, 11)), 0.5)
  np.testing.assert_allclose(faithfulness.trapezoid_auc(jnp.full((3, 5), 0.7)), [0.7] * 3)
  # Hand-computed: x = 0, 1/2, 1 with values 0, 1, 0 -> triangle of area 1/2.
  np.testing.assert_allclose(faithfulness.trapezoid_auc(jnp.array([0.0, 1.0, 0.0])), 0.5)


def test_saliency_ranks_order_pixels_by_decreasing_saliency_with_ties_by_position():
  saliency = jnp.array([[[0.1, 0.9], [0.5, 0.5]]])
  np.testing.assert_array_equal(faithfulness.saliency_ranks(saliency), [[[3, 0], [1, 2]]])


def _region_model():
  """Class-0 logit = 10 * mean brightness of the top-left 2x2 region; class 1 logit 0.
  A saliency map on that region is the faithful explanation."""

  def logits_fn(images):
    region = jnp.mean(images[:, :2, :2, 0], axis=(1, 2))
    return jnp.stack([10 * region, jnp.zeros_like(region)], axis=-1)

  return logits_fn


def _region_saliency(n):
  good = jnp.zeros((n, S, S)).at[:, :2, :2].set(1.0)
  return good, 1.0 - good  # the faithful map and its reverse


def test_faithful_map_keeps_the_score_and_its_reverse_drops_it():
  logits_fn, images = _region_model(), jnp.ones((3, S, S, 1))
  good, bad = _region_saliency(3)
  prob = lambda x: jax.nn.softmax(logits_fn(x))[:, 0]
  y = prob(images)
  kept = faithfulness.drop_gain_increase(y, prob(faithfulness.mask_with_saliency(images, good)))
  lost = faithfulness.drop_gain_increase(y, prob(faithfulness.mask_with_saliency(images, bad)))
  np.testing.assert_allclose(kept['average_drop'], 0.0, atol=1e-5)
  assert float(lost['average_drop'].min()) > 40  # y ~ 1 -> o = 1/2: drop ~ 50%


def naive_insertion_deletion(logits_fn, images, saliency, targets, n_steps, blurred):
  """One image, one step at a time, pixels taken in numpy's order of decreasing saliency."""
  ins, dele = [], []
  for i in range(images.shape[0]):
    order = np.argsort(-np.asarray(saliency[i]).ravel(), kind='stable')
    curves = {'ins': [], 'del': []}
    for s in range(n_steps + 1):
      k = int(np.round(s * S * S / n_steps))
      top = np.zeros(S * S, bool)
      top[order[:k]] = True
      top = top.reshape(S, S, 1)
      for name, image in (
        ('ins', np.where(top, images[i], blurred[i])),
        ('del', np.where(top, 0.0, images[i])),
      ):
        logits = np.asarray(logits_fn(jnp.asarray(image)[None]))[0]
        p = np.exp(logits - logits.max())
        curves[name].append(p[targets[i]] / p.sum())
    area = lambda c: np.trapezoid(c, dx=1 / n_steps)
    ins.append(area(curves['ins']))
    dele.append(area(curves['del']))
  return np.array(ins), np.array(dele)


@pytest.mark.parametrize('n_steps,steps_per_call', [(5, 4), (6, 1), (4, 8)])
def test_insertion_deletion_equal_naive_loop(n_steps, steps_per_call):
  keys = jax.random.split(jax.random.key(0), 3)
  images = jax.random.uniform(keys[0], (4, S, S, 1))
  saliency = jax.random.uniform(keys[1], (4, S, S))
  targets = jnp.array([0, 1, 0, 1])
  w = jax.random.normal(keys[2], (S * S, 3))
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w
  blurred = faithfulness.blur(images)
  got = jax.jit(faithfulness.insertion_deletion, static_argnums=(0, 4, 5))(
    logits_fn, images, saliency, targets, n_steps, steps_per_call, blurred
  )
  want_ins, want_del = naive_insertion_deletion(
    logits_fn, images, saliency, targets, n_steps, blurred
  )
  np.testing.assert_allclose(got['insertion'], want_ins, rtol=1e-5)
  np.testing.assert_allclose(got['deletion'], want_del, rtol=1e-5)


def test_faithful_map_has_lower_deletion_and_higher_insertion_than_its_reverse():
  logits_fn, images = _region_model(), jnp.ones((2, S, S, 1))
  targets = jnp.zeros(2, jnp.int32)
  good, bad = _region_saliency(2)
  blurred = jnp.zeros_like(images)
  faithful = faithfulness.insertion_deletion(logits_fn, images, good, targets, 9, blurred=blurred)
  reverse = faithfulness.insertion_deletion(logits_fn, images, bad, targets, 9, blurred=blurred)
  assert float(faithful['deletion'].max()) < float(reverse['deletion'].min()) - 0.3
  assert float(faithful['insertion'].min()) > float(reverse['insertion'].max()) + 0.3


def test_blur_keeps_a_constant_image_inside_and_smooths_an_edge():
  images = jnp.zeros((1, 20, 20, 1)).at[:, :, 10:].set(1.0)
  blurred = faithfulness.blur(images)
  row = np.asarray(blurred[0, 10, :, 0])
  assert 0 < row[9] < row[10] < 1 and np.all(np.diff(row[4:16]) >= -1e-6)
