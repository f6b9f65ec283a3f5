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


def test_degenerate_terms_flag_saturated_images_and_constant_maps_exactly():
  """Hand-built: an image is saturated only when Y, O, insertion and deletion all exceed
  0.99; a map is constant when it spans at most 1e-6, zero or not."""
  y = jnp.array([0.999, 0.999, 0.999, 0.5, 0.995])
  o = jnp.array([0.998, 0.999, 0.98, 0.5, 0.999])
  auc = {
    'insertion': jnp.array([0.999, 0.999, 1.0, 0.5, 0.992]),
    'deletion': jnp.array([0.996, 0.9, 1.0, 0.5, 0.991]),
  }
  maps = jnp.zeros((5, S, S)).at[1].set(0.5).at[2, 0, 0].set(1.0).at[3, 2, 3].set(1e-7)
  maps = maps.at[4].set(jnp.linspace(0, 1, S * S).reshape(S, S))
  got = jax.device_get(faithfulness.degenerate_terms(y, o, auc, maps))
  np.testing.assert_array_equal(got['saturated'], [1, 0, 0, 0, 1])
  np.testing.assert_array_equal(got['constant_map'], [1, 1, 0, 1, 0])


def test_a_model_that_ignores_its_input_is_saturated_and_a_faithful_one_is_not():
  """Through the real metrics: logits independent of the image keep Y = O = insertion =
  deletion ~ 1 for any map (every image flagged); the region model with its faithful map
  loses the score on deletion (none flagged)."""
  images, (good, _) = jnp.ones((3, S, S, 1)), _region_saliency(3)
  targets = jnp.zeros(3, jnp.int32)
  saturated_fn = lambda x: jnp.zeros((x.shape[0], 2)).at[:, 0].set(20.0)
  for logits_fn, expected in ((saturated_fn, 1), (_region_model(), 0)):
    prob = lambda x, f=logits_fn: jax.nn.softmax(f(x))[:, 0]
    y, o = prob(images), prob(faithfulness.mask_with_saliency(images, good))
    auc = faithfulness.insertion_deletion(logits_fn, images, good, targets, 4)
    flags = faithfulness.degenerate_terms(y, o, auc, good)
    np.testing.assert_array_equal(flags['saturated'], [expected] * 3)
    np.testing.assert_array_equal(flags['constant_map'], [0] * 3)


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
  """The previous convention: one image, one step at a time, round(s * H * W / n_steps)
  pixels taken in numpy's order of decreasing saliency, deleted to black."""
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


def rise_insertion_deletion(logits_fn, images, saliency, targets, step, blurred, baseline):
  """CA-Stream's ins_del.py (RISE's CausalMetric) as a loop: score the image, then move the
  next `step` most salient pixels from the start image to the finish image; n_steps =
  ceil(H * W / step) (the last move partial); auc over the n_steps + 1 scores at equal x."""
  hw = S * S
  n_steps = (hw + step - 1) // step
  out = {'insertion': [], 'deletion': []}
  for i in range(images.shape[0]):
    image = np.asarray(images[i]).reshape(hw, -1)
    order = np.argsort(-np.asarray(saliency[i]).ravel(), kind='stable')
    for mode, start, finish in (
      ('insertion', np.asarray(blurred[i]).reshape(hw, -1).copy(), image),
      ('deletion', image.copy(), np.broadcast_to(baseline, image.shape)),
    ):
      scores = []
      for k in range(n_steps + 1):
        logits = np.asarray(logits_fn(jnp.asarray(start.reshape(images.shape[1:]))[None]))[0]
        p = np.exp(logits - logits.max())
        scores.append(p[targets[i]] / p.sum())
        coords = order[step * k : step * (k + 1)]
        start[coords] = finish[coords]
      scores = np.array(scores)
      out[mode].append((scores.sum() - scores[0] / 2 - scores[-1] / 2) / n_steps)
  return np.array(out['insertion']), np.array(out['deletion'])


def _linear_case(channels=1):
  keys = jax.random.split(jax.random.key(0), 3)
  images = jax.random.uniform(keys[0], (4, S, S, channels))
  saliency = jax.random.uniform(keys[1], (4, S, S))
  targets = jnp.array([0, 1, 0, 1])
  w = jax.random.normal(keys[2], (S * S * channels, 3))
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w
  return logits_fn, images, saliency, targets


@pytest.mark.parametrize('n_steps,steps_per_call', [(5, 4), (6, 1), (4, 8)])
def test_insertion_deletion_equal_naive_loop_previous_convention(n_steps, steps_per_call):
  logits_fn, images, saliency, targets = _linear_case()
  blurred = faithfulness.blur(images)
  got = jax.jit(faithfulness.insertion_deletion, static_argnums=(0, 4, 5))(
    logits_fn, images, saliency, targets, n_steps, steps_per_call, blurred
  )
  want_ins, want_del = naive_insertion_deletion(
    logits_fn, images, saliency, targets, n_steps, blurred
  )
  np.testing.assert_allclose(got['insertion'], want_ins, rtol=1e-5)
  np.testing.assert_allclose(got['deletion'], want_del, rtol=1e-5)


@pytest.mark.parametrize('pixels_per_step,steps_per_call', [(5, 4), (12, 1), (0, 2)])
def test_insertion_deletion_equal_ca_streams_loop(pixels_per_step, steps_per_call):
  """Pixels per step 5 (8 steps, the last of 1 pixel), 12 (3 steps) and the default 8 * side
  = 48 > 36 (one step); two channels, deletion to a per-channel mean."""
  logits_fn, images, saliency, targets = _linear_case(channels=2)
  mean = jnp.array([0.3, 0.6])
  blurred = faithfulness.rise_blur(images, mean)
  got = faithfulness.insertion_deletion(
    logits_fn,
    images,
    saliency,
    targets,
    steps_per_call=steps_per_call,
    baseline=mean,
    pixels_per_step=pixels_per_step,
  )
  step = pixels_per_step or 8 * S
  want_ins, want_del = rise_insertion_deletion(
    logits_fn, images, saliency, targets, step, blurred, np.asarray(mean)
  )
  np.testing.assert_allclose(got['insertion'], want_ins, rtol=1e-5)
  np.testing.assert_allclose(got['deletion'], want_del, rtol=1e-5)


def test_step_counts_of_both_rules():
  np.testing.assert_array_equal(faithfulness.step_counts(28, 28), [0, 224, 448, 672, 784])
  np.testing.assert_array_equal(
    faithfulness.step_counts(6, 6, pixels_per_step=10), [0, 10, 20, 30, 36]
  )
  np.testing.assert_array_equal(faithfulness.step_counts(6, 6, n_steps=4), [0, 9, 18, 27, 36])
  assert len(faithfulness.step_counts(224, 224, pixels_per_step=224)) == 225  # RISE's


def test_deletion_to_the_mean_feeds_zeros_in_normalised_space():
  """One step removes every pixel: the deleted image is the mean image, so a model that
  reads normalised pixels sees zeros (logits 0, probability 1/2); deleting to black it
  sees -mean / std."""
  mean, std = jnp.array([0.3, 0.6]), jnp.array([0.2, 0.5])
  logits_fn = lambda x: jnp.stack(
    [jnp.sum((x - mean) / std, axis=(1, 2, 3)), jnp.zeros(len(x))], -1
  )
  images = jax.random.uniform(jax.random.key(0), (2, S, S, 2))
  saliency = jax.random.uniform(jax.random.key(1), (2, S, S))
  targets = jnp.zeros(2, jnp.int32)
  p0 = jax.nn.softmax(logits_fn(images))[:, 0]
  kw = dict(blurred=images, pixels_per_step=S * S)
  to_mean = faithfulness.insertion_deletion(
    logits_fn, images, saliency, targets, baseline=mean, **kw
  )
  np.testing.assert_allclose(to_mean['deletion'], (p0 + 0.5) / 2, rtol=1e-6)
  to_black = faithfulness.insertion_deletion(logits_fn, images, saliency, targets, **kw)
  black = jax.nn.sigmoid(S * S * jnp.sum(-mean / std))
  np.testing.assert_allclose(to_black['deletion'], (p0 + black) / 2, rtol=1e-5, atol=1e-7)


def gkern(size, sigma):
  """RISE's and CA-Stream's kernel: a unit impulse smoothed by scipy's gaussian_filter."""
  from scipy.ndimage import gaussian_filter

  impulse = np.zeros((size, size))
  impulse[size // 2, size // 2] = 1
  return gaussian_filter(impulse, sigma)


@pytest.mark.parametrize('size', [5, 11])
def test_rise_kernel_equals_gkern(size):
  np.testing.assert_allclose(faithfulness.rise_kernel(size, 5.0), gkern(size, 5.0), atol=1e-7)


def test_ca_streams_5x5_sigma_5_kernel_is_a_box_filter():
  np.testing.assert_allclose(faithfulness.rise_kernel(5, 5.0), np.full((5, 5), 1 / 25), atol=1e-5)


@pytest.mark.parametrize('size', [5, 11])
def test_rise_blur_is_a_zero_padded_convolution_in_normalised_space(size):
  """conv2d(normalised image, gkern, padding=size // 2) as RISE and CA-Stream run it, by a
  numpy loop, mapped back to pixels, equals rise_blur with the mean as fill."""
  mean, std = np.array([0.3, 0.6]), np.array([0.2, 0.5])
  images = np.asarray(jax.random.uniform(jax.random.key(0), (2, 12, 12, 2)))
  kernel, r = gkern(size, 5.0), size // 2
  normalised = np.pad((images - mean) / std, ((0, 0), (r, r), (r, r), (0, 0)))
  want = np.zeros_like(images)
  for y in range(12):
    for x in range(12):
      window = normalised[:, y : y + size, x : x + size, :]
      want[:, y, x, :] = np.einsum('nhwc,hw->nc', window, kernel)
  want = want * std + mean
  got = faithfulness.rise_blur(jnp.asarray(images), jnp.asarray(mean), size, 5.0)
  np.testing.assert_allclose(got, want, atol=1e-5)


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


def reference_imputation(image, removed):
  """ROAD's linear system for one image `(H, W, C)` built entry by entry and solved in float64
  by scipy's sparse LU: each removed pixel minus the weighted mean of its in-image neighbours
  is 0."""
  from scipy.sparse import lil_matrix
  from scipy.sparse.linalg import spsolve

  height, width = removed.shape
  index = -np.ones((height, width), int)
  index[removed] = np.arange(removed.sum())
  a = lil_matrix((removed.sum(), removed.sum()))
  b = np.zeros((removed.sum(), image.shape[-1]))
  for i, j in zip(*np.nonzero(removed)):
    row = index[i, j]
    for (di, dj), weight in faithfulness.NEIGHBOUR_WEIGHTS:
      y, x = i + di, j + dj
      if 0 <= y < height and 0 <= x < width:
        a[row, row] += weight
        if removed[y, x]:
          a[row, index[y, x]] -= weight
        else:
          b[row] += weight * image[y, x]
  out = np.array(image, np.float64)
  out[removed] = spsolve(a.tocsc(), b).reshape(-1, image.shape[-1])
  return out


impute = jax.jit(faithfulness.noisy_linear_imputation)  # one compilation per shape


def _imputation_case(n=4, side=12, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(n, side, side, channels)).astype(np.float32)
  removed = rng.uniform(size=(n, side, side)) < np.linspace(0.2, 0.9, n)[:, None, None]
  removed[-1, :7, :9] = True  # a large blob touching two borders
  return images, removed


def test_noisy_linear_imputation_equals_sparse_solve_and_keeps_known_pixels():
  images, removed = _imputation_case()
  got = np.asarray(impute(images, removed, jax.random.key(0), 0.0))
  for i in range(len(images)):
    np.testing.assert_allclose(got[i], reference_imputation(images[i], removed[i]), atol=1e-5)
  np.testing.assert_array_equal(got[~removed], images[~removed])


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch under numpy 2
def test_noisy_linear_imputation_equals_pytorch_grad_cam():
  torch = pytest.importorskip('torch')
  road = pytest.importorskip('pytorch_grad_cam.metrics.road')
  images, removed = _imputation_case()
  got = np.asarray(impute(images, removed, jax.random.key(0), 0.0))
  imputer = road.NoisyLinearImputer(noise=0.0)
  for i in range(len(images)):
    want = imputer(
      torch.from_numpy(images[i].transpose(2, 0, 1)), torch.from_numpy(1.0 - removed[i])
    )
    np.testing.assert_allclose(got[i], want.numpy().transpose(1, 2, 0), atol=1e-5)


def test_imputation_noise_has_the_asked_spread_on_removed_pixels_only():
  images, removed = _imputation_case(n=2, side=32, channels=2)
  key = jax.random.key(1)
  clean = impute(images, removed, key, 0.0)
  noisy = impute(images, removed, key, 0.05)
  again = impute(images, removed, key, 0.05)
  other = impute(images, removed, jax.random.key(2), 0.05)
  diff = np.asarray(noisy - clean)
  np.testing.assert_array_equal(diff[~removed], 0.0)
  assert abs(diff[removed].mean()) < 0.005 and abs(diff[removed].std() - 0.05) < 0.005
  np.testing.assert_array_equal(noisy, again)
  assert not np.allclose(noisy, other)


def test_imputation_of_flat_and_fully_removed_images():
  images = jnp.full((2, 8, 8, 1), 0.3)
  removed = jnp.zeros((2, 8, 8), bool).at[0, 2:6, 1:8].set(True).at[1].set(True)
  got = np.asarray(impute(images, removed, jax.random.key(0), 0.0))
  np.testing.assert_allclose(got[0], 0.3, atol=1e-6)  # a flat image stays flat
  np.testing.assert_array_equal(got[1], 0.0)  # nothing known: 0, not NaN


def naive_road(logits_fn, images, saliency, targets, percentiles):
  """One image and one percentile at a time: numpy's order of decreasing saliency, the
  reference imputation, the model on one image."""
  curves = {'morf': [], 'lerf': []}
  side = images.shape[1]
  for i in range(images.shape[0]):
    order = np.argsort(-np.asarray(saliency[i]).ravel(), kind='stable')
    for name in curves:
      row = []
      for p in percentiles:
        k = int(np.round(p / 100 * side * side))
        chosen = order[:k] if name == 'morf' else order[side * side - k :]
        removed = np.zeros(side * side, bool)
        removed[chosen] = True
        image = reference_imputation(np.asarray(images[i]), removed.reshape(side, side))
        logits = np.asarray(logits_fn(jnp.asarray(image, jnp.float32)[None]))[0]
        p_all = np.exp(logits - logits.max())
        row.append(p_all[targets[i]] / p_all.sum())
      curves[name].append(row)
  return {name: np.array(rows) for name, rows in curves.items()}


@pytest.mark.parametrize(
  'percentiles,per_call', [((10, 20, 30, 40, 50, 60, 70, 80, 90), 4), ((25, 75), 1)]
)
def test_road_equals_naive_loop(percentiles, per_call):
  keys = jax.random.split(jax.random.key(0), 3)
  images = jax.random.uniform(keys[0], (4, S, S, 2))
  saliency = jax.random.uniform(keys[1], (4, S, S))
  targets = jnp.array([0, 1, 2, 1])
  w = jax.random.normal(keys[2], (S * S * 2, 3))
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w
  got = jax.jit(faithfulness.road, static_argnums=(0, 5, 6, 7, 8))(
    logits_fn, images, saliency, targets, jax.random.key(1), percentiles, 'both', 0.0, per_call
  )
  want = naive_road(logits_fn, images, saliency, targets, percentiles)
  for name in ('morf', 'lerf'):
    np.testing.assert_allclose(got[f'road_{name}_curve'], want[name], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[f'road_{name}'], want[name].mean(-1), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
    got['road_combined'], (want['lerf'] - want['morf']).mean(-1) / 2, rtol=1e-4, atol=1e-6
  )


def test_road_noise_does_not_depend_on_chunking_or_order():
  keys = jax.random.split(jax.random.key(3), 2)
  images = jax.random.uniform(keys[0], (3, S, S, 1))
  saliency = jax.random.uniform(keys[1], (3, S, S))
  targets = jnp.array([0, 1, 0])
  road = jax.jit(faithfulness.road, static_argnums=(0, 5, 6, 7, 8))
  args = (_region_model(), images, saliency, targets, jax.random.key(4), (20, 50, 80))
  both = road(*args, 'both', 0.05, 2)  # two calls, the second padded
  morf = road(*args, 'morf', 0.05, 1)
  np.testing.assert_allclose(morf['road_morf_curve'], both['road_morf_curve'], rtol=1e-6)
  assert set(morf) == {'road_morf', 'road_morf_curve'}
  assert set(both) == {'road_morf', 'road_lerf', 'road_combined'} | {
    f'road_{o}_curve' for o in ('morf', 'lerf')
  }
  with pytest.raises(ValueError, match='order'):
    faithfulness.road(*args, order='most')


def test_road_morf_drops_the_score_of_a_faithful_map_and_lerf_keeps_it():
  """The region model's score is the region's brightness: on a bright region in a dark image,
  removing the region first (MoRF) imputes it from the dark surround and drops the score;
  removing the rest first (LeRF) leaves it. The target probability is sigmoid(10 * brightness):
  1/2 for a dark region, ~1 for a bright one."""
  images = jnp.zeros((4, S, S, 1)).at[:, :2, :2].set(1.0)
  good, bad = _region_saliency(2)
  percentiles = (10, 30, 50)  # 4, 11 and 18 of 36 pixels: the region is 4
  got = faithfulness.road(
    _region_model(),
    images,
    jnp.concatenate([good, bad]),
    jnp.zeros(4, jnp.int32),
    jax.random.key(0),
    percentiles,
    noise=0.0,
  )
  faithful = {name: value[:2] for name, value in got.items()}
  reverse = {name: value[2:] for name, value in got.items()}
  assert float(faithful['road_morf'].max()) < 0.51 and float(faithful['road_lerf'].min()) > 0.99
  assert float(reverse['road_morf'].min()) > 0.99 and float(reverse['road_lerf'].max()) < 0.51
  assert float(faithful['road_combined'].min()) > float(reverse['road_combined'].max()) + 0.4


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch under numpy 2
def test_road_equals_pytorch_grad_cam_road_with_its_percentiles_mirrored():
  """pytorch-grad-cam's percentile p keeps p% of the pixels, so its curve at p is ours at
  100 - p, and the means over 10, ..., 90 are the same (noise 0, distinct saliency values)."""
  torch = pytest.importorskip('torch')
  pgc = pytest.importorskip('pytorch_grad_cam.metrics.perturbation_confidence')
  road_module = pytest.importorskip('pytorch_grad_cam.metrics.road')
  targets_module = pytest.importorskip('pytorch_grad_cam.utils.model_targets')
  rng = np.random.default_rng(0)
  n, side, channels = 3, 10, 3
  images = rng.uniform(size=(n, side, side, channels)).astype(np.float32)
  saliency = rng.permutation(n * side * side).reshape(n, side, side).astype(np.float32) / 300
  targets = [0, 2, 1]
  w = rng.normal(size=(channels * side * side, 3)).astype(np.float32)
  model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(w.shape[0], 3, bias=False))
  model.eval()
  with torch.no_grad():
    model[1].weight.copy_(torch.from_numpy(w.T))  # flattens (C, H, W)
  logits_fn = lambda x: jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1) @ w
  percentiles = (10, 20, 30, 40, 50, 60, 70, 80, 90)
  got = faithfulness.road(
    logits_fn, images, saliency, jnp.array(targets), jax.random.key(0), percentiles, noise=0.0
  )
  imputer = road_module.NoisyLinearImputer(noise=0.0)
  soft = [targets_module.ClassifierOutputSoftmaxTarget(t) for t in targets]
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  for name, removal in (
    ('morf', pgc.RemoveMostRelevantFirst),
    ('lerf', pgc.RemoveLeastRelevantFirst),
  ):
    theirs = np.stack(
      [
        pgc.PerturbationConfidenceMetric(removal(p, imputer))(
          x, saliency, soft, model, return_diff=False
        )
        for p in percentiles[::-1]
      ],
      axis=1,
    )
    np.testing.assert_allclose(got[f'road_{name}_curve'], theirs, atol=1e-5)
