"""SESS (Tursun et al. 2022, "SESS: Saliency Enhancing with Scaling and Sliding").

A meta-method: it makes a CAM method's maps robust to the object's scale, to several
objects and to distractors. The image is resized to several scales (the shorter side to
`window + round(window * 2/7) * i` for 12 scales by default), a window the size of the
model's input slides over every scale, and each patch is explained with the base method
(Grad-CAM by default) and scored by the model (the target's softmax probability). Each
patch map, at window size in [0, 1] and times its score over the best patch's, is pasted
back where it was taken from and brought to the image's frame; the pasted maps are fused
by a mean over the patches that mark each pixel above `theta` (or their maximum), and the
result blurred (Gaussian, 11x11, sigma 5).

All of it is batched: every patch of a scale of every image goes through the model in one
call (in chunks of `chunk` patches, a `lax.map`), and pasting and resizing are matrix
products with resize matrices made at trace time, so one jitted call serves the batch.
This follows pytorch-grad-cam's `SESS` (its defaults; resizing as torchvision and OpenCV
do) and equals it on identical weights; its pre-filtering (`pre_filter_ratio`) drops the
lowest-scoring patches from the fusion, whose maps are computed all the same here.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bcam_jax import cam

# (patches (M, S, S, C), targets (M,)) -> (maps (M, h, w) >= 0 at the explained layer,
# logits (M, classes)): the base method and the model's scores of a batch of patches.
PatchFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

POOLS = ('mean', 'max')
BLUR_SIZE, BLUR_SIGMA = 11, 5.0  # pytorch-grad-cam's cv2.GaussianBlur(cam, (11, 11), 5)


def default_scales(window: int, num_scales: int = 12, step_ratio: float = 2.0 / 7.0) -> list[int]:
  """The shorter side at each scale: `window + round(window * step_ratio) * i` (224, 288,
  ..., 928 for a 224 window, the paper's)."""
  step = int(round(window * step_ratio))
  return [window + step * i for i in range(num_scales)]


def window_starts(length: int, step: int, window: int) -> list[int]:
  """Where the windows along one side start: every `step`, the last shifted back inside."""
  starts = []
  for start in range(0, length, step):
    if start + window >= length:
      starts.append(max(length - window, 0))
      break
    starts.append(start)
  return starts


def resized_shape(height: int, width: int, short: int) -> tuple[int, int]:
  """The image's shape with its shorter side resized to `short`, as torchvision does."""
  if height <= width:
    return short, int(short * width / height)
  return int(short * height / width), short


def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """`(n_out, n_in)` weights of a bilinear resize along one axis with half-pixel centres
  and edge clamping (OpenCV's `INTER_LINEAR`, which its 2x downscale equals)."""
  matrix = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    x = (i + 0.5) * n_in / n_out - 0.5
    x0 = int(np.floor(x))
    frac = x - x0
    if x0 < 0:
      x0, frac = 0, 0.0
    if x0 >= n_in - 1:
      x0, frac = n_in - 1, 0.0
    matrix[i, x0] += 1 - frac
    if frac:
      matrix[i, x0 + 1] += frac
  return matrix


def gaussian_blur(maps: jax.Array) -> jax.Array:
  """OpenCV's `GaussianBlur(map, (11, 11), 5)` of `(N, H, W)` maps: a separable Gaussian,
  the border reflected without its edge pixel (`BORDER_REFLECT_101`)."""
  offsets = np.arange(BLUR_SIZE) - (BLUR_SIZE - 1) / 2
  kernel = np.exp(-(offsets**2) / (2 * BLUR_SIGMA**2))
  kernel = jnp.asarray(kernel / kernel.sum(), jnp.float32)
  pad = BLUR_SIZE // 2
  padded = jnp.pad(maps, ((0, 0), (pad, pad), (pad, pad)), mode='reflect')
  height, width = maps.shape[1:]
  rows = sum(kernel[i] * padded[:, i : i + height, :] for i in range(BLUR_SIZE))
  return sum(kernel[j] * rows[:, :, j : j + width] for j in range(BLUR_SIZE))


def windows(
  height: int,
  width: int,
  window_size: int | None = None,
  step_size: int | None = None,
  scales: list[int] | None = None,
  num_scales: int = 12,
  scale_step_ratio: float = 2.0 / 7.0,
) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
  """Per scale, the resized image's shape and its windows' top-left corners `(y, x)`, for
  an image of `height` x `width` (the options as `sess` takes them). At the defaults a
  square image has 122 windows whatever its size: the scales grow with the window."""
  window = window_size or min(height, width)
  step = step_size or window
  sides = scales or default_scales(window, num_scales, scale_step_ratio)
  if min(sides) < window:
    raise ValueError(f'scales={sides}; expected sides of at least the window, {window}')
  layout = []
  for side in sides:
    sh, sw = resized_shape(height, width, side)
    rows, cols = window_starts(sh, step, window), window_starts(sw, step, window)
    layout.append(((sh, sw), [(y, x) for y in rows for x in cols]))
  return layout


def _in_chunks(patch_fn: PatchFn, patches: jax.Array, targets: jax.Array, chunk: int):
  """`patch_fn` over `(M, ...)` patches `chunk` at a time (`lax.map`), the last chunk padded."""
  m = patches.shape[0]
  if m <= chunk:
    return patch_fn(patches, targets)
  n_chunks = -(-m // chunk)
  pad = n_chunks * chunk - m
  patches = jnp.pad(patches, ((0, pad),) + ((0, 0),) * (patches.ndim - 1))
  targets = jnp.pad(targets, (0, pad))
  maps, logits = jax.lax.map(
    lambda xs: patch_fn(*xs),
    (patches.reshape((n_chunks, chunk) + patches.shape[1:]), targets.reshape(n_chunks, chunk)),
  )
  flat = lambda a: a.reshape((n_chunks * chunk,) + a.shape[2:])[:m]
  return flat(maps), flat(logits)


def sess(
  patch_fn: PatchFn,
  pixels: jax.Array,
  targets: jax.Array,
  *,
  scales: list[int] | None = None,
  num_scales: int = 12,
  scale_step_ratio: float = 2.0 / 7.0,
  window_size: int | None = None,
  step_size: int | None = None,
  pre_filter_ratio: float = 0.0,
  theta: float = 0.0,
  pool: str = 'mean',
  smooth: bool = True,
  use_softmax_scores: bool = True,
  chunk: int = 64,
) -> jax.Array:
  """SESS maps `(N, H, W)` of the images (not scaled; non-negative).

  Args:
    patch_fn: the base method and the scores of a batch of window-sized patches
      (`PatchFn`).
    pixels: the images, `(N, H, W, C)`.
    targets: class indices `(N,)`.
    scales: the shorter side at each scale (default `default_scales(window_size,
      num_scales, scale_step_ratio)`); each at least the window.
    num_scales: the number of default scales.
    scale_step_ratio: the default scales' step over the window's side.
    window_size: the sliding window's side (default the image's shorter side, so the first
      scale is the image itself).
    step_size: the window's stride (default the window: windows do not overlap, except the
      last of a row, shifted back inside).
    pre_filter_ratio: the share of the lowest-scoring patches left out of the fusion.
    theta: pasted values at or below it take no part in the mean.
    pool: 'mean' (the paper's spatial weighted average) or 'max'.
    smooth: the final Gaussian blur.
    use_softmax_scores: a patch's weight from the target's softmax probability (the
      paper); False for the target logit, clipped at 0.
    chunk: patches per call of `patch_fn`, so memory is bounded whatever the scales.
  """
  if pool not in POOLS:
    raise ValueError(f'pool={pool!r}; expected one of {", ".join(POOLS)}')
  if not 0.0 <= pre_filter_ratio < 1.0:
    raise ValueError(f'pre_filter_ratio={pre_filter_ratio}; expected a value in [0, 1)')
  n, height, width = pixels.shape[:3]
  window = window_size or min(height, width)
  layout = windows(height, width, window, step_size, scales, num_scales, scale_step_ratio)

  patch_maps, patch_scores, placements = [], [], []
  for (sh, sw), corners in layout:
    scaled = jax.image.resize(pixels, (n, sh, sw, pixels.shape[3]), method='linear')
    patches = jnp.stack([scaled[:, y : y + window, x : x + window] for y, x in corners], 1)
    flat = patches.reshape((n * len(corners),) + patches.shape[2:])
    patch_targets = jnp.repeat(targets, len(corners))
    maps, logits = _in_chunks(patch_fn, flat, patch_targets, chunk)
    score_fn = cam.target_probability if use_softmax_scores else cam.target_scores
    scores = score_fn(cam.at_least_float32(logits), patch_targets)
    window_maps = cam.normalize_cam(cam.upsample_cam(cam.at_least_float32(maps), window))
    patch_maps.append(window_maps.reshape((n, len(corners), window, window)))
    patch_scores.append(jnp.maximum(scores, 0).reshape(n, len(corners)))
    rows, cols = linear_resize_matrix(sh, height), linear_resize_matrix(sw, width)
    placements.append(
      (
        jnp.asarray(np.stack([rows[:, y : y + window] for y, _ in corners]), jnp.float32),
        jnp.asarray(np.stack([cols[:, x : x + window] for _, x in corners]), jnp.float32),
      )
    )

  scores = jnp.concatenate(patch_scores, 1)  # (N, P)
  ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  kept = ranks >= int(scores.shape[1] * pre_filter_ratio)
  best = jnp.max(scores, axis=1, keepdims=True)
  weights = jnp.where(best > 0, scores / jnp.where(best > 0, best, 1), 1.0) * kept

  total = jnp.zeros((n, height, width), jnp.float32)
  counts = jnp.zeros((n, height, width), jnp.float32)
  start = 0
  for maps, (rows, cols) in zip(patch_maps, placements, strict=True):
    w = weights[:, start : start + maps.shape[1]]
    in_fusion = kept[:, start : start + maps.shape[1], None, None]
    start += maps.shape[1]
    # Each patch map pasted into its scale's frame and resized to the image: rows @ map @ cols^T.
    pasted = jnp.einsum('phi,npij,pwj->nphw', rows, maps, cols) * w[:, :, None, None]
    if pool == 'max':
      total = jnp.maximum(total, jnp.max(pasted, axis=1))
    else:
      marked = (pasted > theta) & in_fusion
      total = total + jnp.sum(jnp.where(marked, pasted, 0), axis=1)
      counts = counts + jnp.sum(marked, axis=1)
  if pool == 'mean':
    total = jnp.where(counts > 0, total / jnp.where(counts > 0, counts, 1), 0)
  return gaussian_blur(total) if smooth else total
