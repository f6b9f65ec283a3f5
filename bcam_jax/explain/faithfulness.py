"""Faithfulness of saliency maps, batched under jit (CA-Stream paper, section 4).

Y is the softmax probability of the target class for an image, O the same for the image
masked by its saliency map (upsampled to the image, in [0, 1], multiplied with the [0, 1]
pixels, then normalised again as any model input):

  Average Drop     = mean(max(0, Y - O) / Y) * 100      (lower is better)
  Average Gain     = mean(max(0, O - Y) / (1 - Y)) * 100 (higher is better)
  Average Increase = mean(1[O > Y]) * 100                (higher is better)

Insertion and Deletion (Petsiuk et al. 2018): pixels ordered by decreasing saliency are
revealed on a blurred copy of the image (insertion) or set to 0 (deletion) in `n_steps`
equal steps; the area under the curve of the target probability against the revealed or
removed fraction, by the trapezoid rule (insertion higher is better, deletion lower).
Every function returns per-image values so the caller can sum them over a masked batch.
"""

import dm_pix
import jax
import jax.numpy as jnp

from bcam_jax.cam import LogitsFn, target_probability


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
  """Gaussian blur of `(N, H, W, C)` images, the insertion start; sigma defaults to
  side / 10 (2.8 px at 28x28), kernel +-2 sigma."""
  sigma = sigma or pixels.shape[1] / 10
  return dm_pix.gaussian_blur(pixels, sigma, kernel_size=2 * int(2 * sigma) + 1)


def trapezoid_auc(curve: jax.Array) -> jax.Array:
  """Area under `(..., S + 1)` values at x = 0, 1/S, ..., 1 by the trapezoid rule."""
  steps = curve.shape[-1] - 1
  return (jnp.sum(curve, axis=-1) - 0.5 * (curve[..., 0] + curve[..., -1])) / steps


def insertion_deletion(
  logits_fn: LogitsFn,
  pixels: jax.Array,
  saliency: jax.Array,
  targets: jax.Array,
  n_steps: int = 25,
  steps_per_call: int = 4,
  blurred: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Insertion and deletion AUCs `(N,)` of saliency `(N, H, W)` for [0, 1] images
  `(N, H, W, C)` and target classes `(N,)`; `logits_fn` maps images to logits.

  Step s reveals or removes the round(s * H * W / n_steps) most salient pixels.
  `steps_per_call` steps of all N images, insertion and deletion together, go through one
  `logits_fn` call of `2 * steps_per_call * N` images, in a `lax.map` over the steps.
  """
  n, height, width, _ = pixels.shape
  ranks = saliency_ranks(saliency)
  blurred = blur(pixels) if blurred is None else blurred
  counts = jnp.round(jnp.arange(n_steps + 1) * (height * width / n_steps))
  n_calls = -(-(n_steps + 1) // steps_per_call)
  counts = jnp.pad(
    counts, (0, n_calls * steps_per_call - n_steps - 1), constant_values=height * width
  )

  def call(step_counts):  # (steps_per_call,) -> (2, steps_per_call, N)
    top = (ranks[None] < step_counts[:, None, None, None])[..., None]  # (s, N, H, W, 1)
    inserted = jnp.where(top, pixels[None], blurred[None])
    deleted = jnp.where(top, 0.0, pixels[None]).astype(pixels.dtype)
    stack = jnp.concatenate([inserted, deleted]).reshape((-1,) + pixels.shape[1:])
    logits = logits_fn(stack).reshape(2, steps_per_call, n, -1)
    return target_probability(logits, jnp.broadcast_to(targets, (2, steps_per_call, n)))

  curves = jax.lax.map(call, counts.reshape(n_calls, steps_per_call))  # (calls, 2, s, N)
  curves = curves.transpose(1, 3, 0, 2).reshape(2, n, -1)[..., : n_steps + 1]
  return {'insertion': trapezoid_auc(curves[0]), 'deletion': trapezoid_auc(curves[1])}
