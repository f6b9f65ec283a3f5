"""Faithfulness of saliency maps, batched under jit (CA-Stream paper, section 4).

Y is the softmax probability of the target class for an image, O the same for the image
masked by its saliency map (upsampled to the image, in [0, 1], multiplied with the [0, 1]
pixels, then normalised again as any model input):

    Average Drop     = mean(max(0, Y - O) / Y) * 100      (lower is better)
    Average Gain     = mean(max(0, O - Y) / (1 - Y)) * 100 (higher is better)
    Average Increase = mean(1[O > Y]) * 100                (higher is better)

Insertion and Deletion (Petsiuk et al. 2018): pixels ordered by decreasing saliency are
revealed on a blurred copy of the image (insertion) or replaced by a baseline (deletion) step
by step; the area under the curve of the target probability against the step (x from 0 to 1
in equal steps), by the trapezoid rule (insertion higher is better, deletion lower). By
default the convention of CA-Stream's evaluation code (its engine/evaluation.py and
engine/interpretable/ins_del.py, derived from RISE's evaluation.py), so the numbers compare
with its tables:

  - insertion starts from the image convolved with RISE's `gkern(5, 5)` (`rise_kernel`), a
    5x5 kernel of sigma 5, zero-padded in normalised space;
  - deletion replaces pixels by 0 in normalised space, i.e. the dataset mean in pixels;
  - each step changes 8 * side pixels (`step_counts`): ceil(side / 8) steps, 28 at 224 px,
    4 at 28 px (the last of 112 pixels, yet as wide on the x axis as the others).

RISE's own evaluation uses an 11x11 kernel of sigma 5 and 224 pixels per step at 224 px.
This project's convention before (`blur`, Gaussian of sigma side / 10; black in pixel
space; `n_steps` equal steps of round(H * W / n_steps) pixels) stays reachable.

ROAD (Rong et al. 2022, remove and debias): the p% most (MoRF) or least (LeRF) salient
pixels are removed and filled by noisy linear imputation, which leaks far less of the removed
region's shape to the model than a constant fill; the target probability of the imputed image,
averaged over percentiles (MoRF lower is better, LeRF higher).
Every function returns per-image values so the caller can sum them over a masked batch.
"""

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

from bcam_jax.cam import LogitsFn, at_least_float32, target_probability


def _safe_ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator, 0 where the denominator is 0 (then the numerator is 0 too)."""
  ok = denominator > 0
  return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


def drop_gain_increase(y: jax.Array, o: jax.Array) -> dict[str, jax.Array]:
  """Per-image Average Drop, Gain and Increase terms, in percent, from Y and O `(N,)`.

  Y = 1 gives gain 0 (nothing to gain), Y = 0 gives drop 0 (nothing to lose).
  """
  return {
    'average_drop': 100 * _safe_ratio(jax.nn.relu(y - o), y),
    'average_gain': 100 * _safe_ratio(jax.nn.relu(o - y), 1 - y),
    'average_increase': 100 * (o > y).astype(y.dtype),
  }


def mask_with_saliency(pixels: jax.Array, saliency: jax.Array) -> jax.Array:
  """[0, 1] images `(N, H, W, C)` times their [0, 1] saliency `(N, H, W)`."""
  return pixels * saliency[..., None].astype(pixels.dtype)


def saliency_ranks(saliency: jax.Array) -> jax.Array:
  """Rank of each pixel `(N, H, W)` in decreasing saliency (0 = most salient; ties by
  position, so every image has a strict order)."""
  n = saliency.shape[0]
  order = jnp.argsort(-saliency.reshape(n, -1), axis=-1, stable=True)
  return jnp.argsort(order, axis=-1).reshape(saliency.shape)


def blur(pixels: jax.Array, sigma: float | None = None) -> jax.Array:
  """The equal-steps convention's insertion start: Gaussian blur of `(N, H, W, C)` images in
  pixel space, zero-padded; sigma defaults to side / 10 (2.8 px at 28x28), kernel +-2
  sigma."""
  sigma = sigma or pixels.shape[1] / 10
  return dm_pix.gaussian_blur(pixels, sigma, kernel_size=2 * int(2 * sigma) + 1)


def _reflect(index: np.ndarray, n: int) -> np.ndarray:
  """Indices into a length-n axis extended by mirroring (d c b a | a b c d | d c b a)."""
  m = np.mod(index, 2 * n)
  return np.where(m >= n, 2 * n - 1 - m, m)


def rise_kernel(size: int = 5, sigma: float = 5.0) -> np.ndarray:
  """RISE's `gkern(size, sigma)` `(size, size)`: a unit impulse at the centre smoothed by
  scipy's `gaussian_filter(sigma)` (taps out to round(4 sigma), mirrored at the borders),
  computed here without scipy. It sums to 1; with sigma near the size the mirrored tails
  flatten it: 5x5 of sigma 5 is a box filter (every weight 0.04 within 3e-6), 11x11 of
  sigma 5 ranges over 0.0077-0.0088."""
  if size < 1 or size % 2 == 0 or not sigma > 0:
    raise ValueError(f'rise_kernel: size={size!r} must be odd and >= 1, sigma={sigma!r} > 0')
  radius = int(4 * sigma + 0.5)
  taps = np.arange(-radius, radius + 1)
  weights = np.exp(-0.5 * (taps / sigma) ** 2)
  weights /= weights.sum()
  hits = _reflect(np.arange(size)[:, None] + taps[None], size) == size // 2
  line = (hits * weights).sum(axis=1)
  return np.outer(line, line).astype(np.float32)


def rise_blur(
  pixels: jax.Array, fill: jax.Array | float = 0.0, size: int = 5, sigma: float = 5.0
) -> jax.Array:
  """CA-Stream's and RISE's insertion start: `(N, H, W, C)` images convolved channel by
  channel with `rise_kernel(size, sigma)`, padded with `fill` (scalar or one value per
  channel). With fill = the normalisation mean this is their `conv2d(x, gkern, padding)` on
  normalised images, which pads with 0 there."""
  c = pixels.shape[-1]
  kernel = jnp.asarray(rise_kernel(size, sigma), pixels.dtype)
  kernel = jnp.broadcast_to(kernel[:, :, None, None], (size, size, 1, c))
  fill = jnp.asarray(fill, pixels.dtype)
  blurred = jax.lax.conv_general_dilated(
    pixels - fill,
    kernel,
    (1, 1),
    'SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=c,
  )
  return blurred + fill


def step_counts(height: int, width: int, n_steps: int = 0, pixels_per_step: int = 0) -> np.ndarray:
  """Pixels revealed or removed after each step, `(S + 1,)` from 0 to H * W.

  n_steps > 0: S = n_steps equal steps, round(s * H * W / n_steps) (the equal-steps
  convention); otherwise `pixels_per_step` per step (0: 8 * max(H, W), CA-Stream's), S =
  ceil(H * W / pixels_per_step), min(s * pixels_per_step, H * W), as RISE.
  """
  size = height * width
  if n_steps > 0:
    return np.round(np.arange(n_steps + 1) * (size / n_steps))
  step = pixels_per_step or 8 * max(height, width)
  return np.minimum(np.arange(-(-size // step) + 1) * step, size).astype(np.float64)


def trapezoid_auc(curve: jax.Array) -> jax.Array:
  """Area under `(..., S + 1)` values at x = 0, 1/S, ..., 1 by the trapezoid rule."""
  steps = curve.shape[-1] - 1
  return (jnp.sum(curve, axis=-1) - 0.5 * (curve[..., 0] + curve[..., -1])) / steps


def insertion_deletion(
  logits_fn: LogitsFn,
  pixels: jax.Array,
  saliency: jax.Array,
  targets: jax.Array,
  n_steps: int = 0,
  steps_per_call: int = 4,
  blurred: jax.Array | None = None,
  baseline: jax.Array | float = 0.0,
  pixels_per_step: int = 0,
) -> dict[str, jax.Array]:
  """Insertion and deletion AUCs `(N,)` of saliency `(N, H, W)` for [0, 1] images
  `(N, H, W, C)` and target classes `(N,)`; `logits_fn` maps images to logits.

  Step s reveals or removes the `step_counts(H, W, n_steps, pixels_per_step)[s]` most
  salient pixels (default: 8 * side per step). Deletion sets them to `baseline` (pixel
  value, scalar or per channel: 0 is black, the normalisation mean is 0 in normalised space,
  CA-Stream's); insertion reveals them on `blurred`, by default `rise_blur(pixels,
  baseline)`. The S + 1 points go in as few `logits_fn` calls of at most `steps_per_call`
  points each as they fit, split evenly (5 points: 2 calls of 3, the last point repeated),
  each call holding that many points of all N images, insertion and deletion together, in a
  `lax.map` over the calls.
  """
  n, height, width, _ = pixels.shape
  ranks = saliency_ranks(saliency)
  baseline = jnp.asarray(baseline, pixels.dtype)
  blurred = rise_blur(pixels, baseline) if blurred is None else blurred
  counts = step_counts(height, width, n_steps, pixels_per_step)
  points = len(counts)
  n_calls = -(-points // steps_per_call)
  per_call = -(-points // n_calls)
  counts = np.pad(counts, (0, n_calls * per_call - points), constant_values=height * width)

  def call(chunk):  # (per_call,) counts -> (2, per_call, N)
    top = (ranks[None] < chunk[:, None, None, None])[..., None]  # (s, N, H, W, 1)
    inserted = jnp.where(top, pixels[None], blurred[None])
    deleted = jnp.where(top, baseline, pixels[None]).astype(pixels.dtype)
    stack = jnp.concatenate([inserted, deleted]).reshape((-1,) + pixels.shape[1:])
    logits = logits_fn(stack).reshape(2, per_call, n, -1)
    return target_probability(logits, jnp.broadcast_to(targets, (2, per_call, n)))

  counts = jnp.asarray(counts.reshape(n_calls, per_call), jnp.float32)
  curves = jax.lax.map(call, counts)  # (calls, 2, s, N)
  curves = curves.transpose(1, 3, 0, 2).reshape(2, n, -1)[..., :points]
  return {'insertion': trapezoid_auc(curves[0]), 'deletion': trapezoid_auc(curves[1])}


# `degenerate_terms`: a target probability above SATURATED_PROBABILITY is saturated; a map
# spanning at most CONSTANT_MAP_RANGE is constant (`cam.normalize_cam` leaves a map spanning
# exactly 1, or 0 when its raw values were constant, so the threshold only has to be well
# below 1).
SATURATED_PROBABILITY = 0.99
CONSTANT_MAP_RANGE = 1e-6


def degenerate_terms(
  y: jax.Array, o: jax.Array, auc: dict[str, jax.Array], saliency: jax.Array
) -> dict[str, jax.Array]:
  """Per-image 0/1 flags `(N,)` of the two cases in which the metrics above say nothing
  about a map, from Y, O `(N,)`, the `insertion_deletion` AUCs and the [0, 1] maps
  `(N, H, W)`, so a report can say how many images they concern:

  - `saturated`: Y, O, insertion and deletion all above `SATURATED_PROBABILITY`: the target
    probability stays ~1 however the image is perturbed (a saturated softmax),
    so Average Drop is ~0, Gain a ratio of rounding errors and insertion and
    deletion ~1 whatever the map.
  - `constant_map`: the map spans at most `CONSTANT_MAP_RANGE` (all zeros once min-max scaled,
    e.g. Grad-CAM whose weighted activations are negative everywhere): O is the
    probability of a black image and insertion and deletion follow the pixels'
    positions, not their saliency.
  """
  p = SATURATED_PROBABILITY
  saturated = (y > p) & (o > p) & (auc['insertion'] > p) & (auc['deletion'] > p)
  spread = jnp.max(saliency, axis=(1, 2)) - jnp.min(saliency, axis=(1, 2))
  return {
    'saturated': saturated.astype(y.dtype),
    'constant_map': (spread <= CONSTANT_MAP_RANGE).astype(y.dtype),
  }


# ROAD's neighbour weights (row offset, column offset) -> weight: 1/6 for the 4 edge neighbours,
# 1/12 for the 4 diagonal ones (the paper's and pytorch-grad-cam's `neighbors_weights`).
NEIGHBOUR_WEIGHTS = (
  ((1, 1), 1 / 12),
  ((0, 1), 1 / 6),
  ((-1, 1), 1 / 12),
  ((1, -1), 1 / 12),
  ((0, -1), 1 / 6),
  ((-1, -1), 1 / 12),
  ((1, 0), 1 / 6),
  ((-1, 0), 1 / 6),
)
# Conjugate-gradient stopping rule of the imputation: relative residual 1e-6, at most
# 4 * max(H, W) iterations. Measured against a float64 sparse solve: 12x12 images end within
# 1e-6 to 5e-6 (the last a 7x9 blob, at float32's floor: the system's condition number, ~ the
# removed region's side squared, times float32's epsilon); 224x224 with 90% removed in one
# blob needs 400-800 iterations and then sits at that floor (~5e-4), 20x below the imputation
# noise (0.01), so more iterations would buy nothing. A tolerance of 0 would not do: a system
# solved exactly divides 0 by 0 in the next step.
IMPUTATION_TOL = 1e-6
IMPUTATION_ITERATIONS_PER_SIDE = 4


def _neighbour_sum(x: jax.Array) -> jax.Array:
  """sum_o w_o x[i + o] over the 8 neighbours o of every pixel of `(..., H, W)`; neighbours
  outside the image count as 0 (pytorch-grad-cam drops them)."""
  height, width = x.shape[-2:]
  padded = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)])
  return sum(
    weight * padded[..., 1 + di : 1 + di + height, 1 + dj : 1 + dj + width]
    for (di, dj), weight in NEIGHBOUR_WEIGHTS
  )


def _linear_imputation(image: jax.Array, removed: jax.Array) -> jax.Array:
  """One channel `(H, W)` with its `removed` pixels solved for: each equals the weighted
  mean of its in-image neighbours, known or removed (ROAD's linear system).

  The system, D x_r - W_rr x_r = W_rk x_k with D the in-image neighbour weight sums, is
  symmetric positive definite on every connected removed region that touches a known pixel,
  so conjugate gradients solve it with the operator as a masked 3x3 stencil. Known pixels get
  identity rows and right-hand side 0, so they stay 0 in the solution and out of the residual.
  """
  m = removed.astype(image.dtype)
  known = 1 - m
  degree = _neighbour_sum(jnp.ones_like(image))
  rhs = m * _neighbour_sum(known * image)

  def operator(x):
    return jnp.where(removed, degree * x - _neighbour_sum(m * x), x)

  # Start from the mean of the known pixels: closer than 0 for any image.
  start = m * jnp.sum(known * image) / jnp.maximum(jnp.sum(known), 1)
  maxiter = IMPUTATION_ITERATIONS_PER_SIDE * max(image.shape)
  solution, _ = jax.scipy.sparse.linalg.cg(
    operator, rhs, start, tol=IMPUTATION_TOL, maxiter=maxiter
  )
  return jnp.where(removed, solution, image)


def noisy_linear_imputation(
  pixels: jax.Array, removed: jax.Array, key: jax.Array, noise: float = 0.01
) -> jax.Array:
  """Images `(N, H, W, C)` with their `removed` pixels `(N, H, W)` (bool) filled by ROAD's
  noisy linear imputation; known pixels are returned unchanged.

  Each removed pixel is the weighted mean of its 8 neighbours (1/6 edge, 1/12 diagonal,
  those outside the image left out and the rest renormalised, as pytorch-grad-cam's
  `NoisyLinearImputer`), known or themselves removed: one sparse linear system per image and
  channel, all solved at once by conjugate gradients (`_linear_imputation`), plus Gaussian
  noise of standard deviation `noise` (absolute, in [0, 1] pixel units; pytorch-grad-cam adds
  it to normalised inputs). Values are not clipped, as there.
  An image with every pixel removed has no known pixel to interpolate (its system is
  singular; pytorch-grad-cam's solver fails): its pixels become 0, as deletion's, plus noise.
  """
  n, height, width, channels = pixels.shape
  x = at_least_float32(pixels)
  has_known = jnp.any(~removed, axis=(1, 2), keepdims=True)
  solvable = jnp.repeat(removed & has_known, channels, axis=0)
  channel_images = jnp.moveaxis(x, -1, 1).reshape(n * channels, height, width)
  solved = jax.vmap(_linear_imputation)(channel_images, solvable)
  solved = jnp.moveaxis(solved.reshape(n, channels, height, width), 1, -1)
  filled = jnp.where(has_known[..., None], solved, 0.0) + noise * jax.random.normal(
    key, x.shape, x.dtype
  )
  return jnp.where(removed[..., None], filled, x).astype(pixels.dtype)


ROAD_ORDERS = {'morf': 0, 'lerf': 1}  # also each order's key offset, the same in 'both'


def road(
  logits_fn: LogitsFn,
  pixels: jax.Array,
  saliency: jax.Array,
  targets: jax.Array,
  key: jax.Array,
  percentiles: tuple[float, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90),
  order: str = 'both',
  noise: float = 0.01,
  percentiles_per_call: int = 3,
) -> dict[str, jax.Array]:
  """ROAD of saliency `(N, H, W)` for [0, 1] images `(N, H, W, C)` and targets `(N,)`.

  At percentile p the round(p / 100 * H * W) most salient pixels (MoRF) or least salient
  (LeRF) are removed (ties by position, as `saliency_ranks`) and imputed by
  `noisy_linear_imputation`; the curves `road_morf_curve` / `road_lerf_curve` `(N, P)` hold
  the target probability of each imputed image, `road_morf` / `road_lerf` `(N,)` their means
  (MoRF lower is better, LeRF higher) and `road_combined` = mean((LeRF - MoRF) / 2), higher
  is better, pytorch-grad-cam's `ROADCombined` sign. `order` is 'morf', 'lerf' or 'both'
  (combined needs both).

  Deviations from pytorch-grad-cam, which thresholds at `np.percentile(cam, p)`: there p is
  the share of pixels kept (MoRF at p removes the top 100 - p %) and every pixel tied with the
  threshold is removed (a whole zero region at once in a ReLU map's LeRF); here p is the
  share removed, as in the paper, and exact. Over symmetric percentiles such as the default
  the means agree. It scores with whatever target callable it is given (often the raw logit)
  and reports differences from the unperturbed score; here it is the target probability itself.

  Noise for order o and percentile index j comes from `fold_in(fold_in(key, j), o)`, so
  values depend neither on `percentiles_per_call` nor on `order`. `percentiles_per_call`
  percentiles of all N images, each order, go through one `logits_fn` call, in a `lax.map`.
  """
  if order not in (*ROAD_ORDERS, 'both'):
    raise ValueError(f"order must be 'morf', 'lerf' or 'both', not {order!r}")
  orders = tuple(ROAD_ORDERS) if order == 'both' else (order,)
  n, height, width, _ = pixels.shape
  n_percentiles = len(percentiles)
  ranks = saliency_ranks(saliency)
  counts = jnp.round(jnp.asarray(percentiles, jnp.float32) / 100 * (height * width))
  n_calls = -(-n_percentiles // percentiles_per_call)
  pad = n_calls * percentiles_per_call - n_percentiles
  counts = jnp.pad(counts, (0, pad), mode='edge').reshape(n_calls, percentiles_per_call)
  indices = jnp.arange(n_calls * percentiles_per_call).reshape(n_calls, percentiles_per_call)
  size = height * width

  def call(chunk):  # (counts, indices) of one call -> (orders, percentiles_per_call, N)
    step_counts, step_indices = chunk
    removed, keys = [], []
    for name in orders:
      k = step_counts[:, None, None, None]
      removed.append(ranks[None] < k if name == 'morf' else ranks[None] >= size - k)
      fold = lambda j, o=ROAD_ORDERS[name]: jax.random.fold_in(jax.random.fold_in(key, j), o)
      keys.append(jax.vmap(fold)(step_indices))
    removed, keys = jnp.concatenate(removed), jnp.concatenate(keys)
    imputed = jax.vmap(noisy_linear_imputation, in_axes=(None, 0, 0, None))(
      pixels, removed, keys, noise
    )
    logits = logits_fn(imputed.reshape((-1,) + pixels.shape[1:]))
    logits = logits.reshape(len(orders), percentiles_per_call, n, -1)
    shape = (len(orders), percentiles_per_call, n)
    return target_probability(logits, jnp.broadcast_to(targets, shape))

  curves = jax.lax.map(call, (counts, indices))  # (calls, orders, per_call, N)
  curves = curves.transpose(1, 3, 0, 2).reshape(len(orders), n, -1)[..., :n_percentiles]
  out = {}
  for name, curve in zip(orders, curves):
    out[f'road_{name}'] = jnp.mean(curve, axis=-1)
    out[f'road_{name}_curve'] = curve
  if order == 'both':
    out['road_combined'] = (out['road_lerf'] - out['road_morf']) / 2
  return out
