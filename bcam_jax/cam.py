"""Class activation maps computed inside `jit`: CAM, Grad-CAM, Grad-CAM++, Score-CAM and
Batch-CAM, each for a whole batch at once.

The gradient-based methods take `head_fn`, a pure and strictly per-sample function mapping CAM-layer
features `(N, h, w, K)` to logits `(N, C)` (e.g. `lambda a: model.apply(variables, a,
method='head')`). Because sample i's logits depend only on sample i's features, one
`jax.vjp` of `head_fn` with the one-hot targets as cotangent yields

    G_i = dS_{i, t_i} / dA_i        for every sample i at once (paper eq. 3),

with no hooks and no per-sample loop. All functions are differentiable, including through
G (second order through the head), so they can sit inside a training loss.

Every map function returns non-negative maps `(N, h, w)` at feature resolution;
`upsample_cam` and `normalize_cam` bring them to image size and [0, 1]. A layer other than
the CAM layer is explained through `bcam_jax.explain.layer_features`, which builds the
matching `head_fn`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

HeadFn = Callable[[jax.Array], jax.Array]
LogitsFn = Callable[[jax.Array], jax.Array]


def at_least_float32(x: jax.Array) -> jax.Array:
  """x in float32, or in its own dtype where that is wider (float64 under x64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def head_gradients(
  head_fn: HeadFn, features: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Logits `(N, C)` and G = d logit[target] / d features `(N, h, w, K)`, per sample."""
  logits, vjp = jax.vjp(head_fn, features)
  (grads,) = vjp(jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype))
  return logits, grads


def channel_combination(features: jax.Array, weights: jax.Array) -> jax.Array:
  """ReLU(sum_k w_k A_k): maps `(..., h, w)` from features `(..., h, w, K)` and channel
  weights `(..., K)`, the last step of every CAM method."""
  cam_map = jnp.einsum('...hwk,...k->...hw', at_least_float32(features), at_least_float32(weights))
  return jax.nn.relu(cam_map)


def weighted_activation(features: jax.Array, grads: jax.Array) -> jax.Array:
  """ReLU(sum_k alpha_k A_k) with alpha = spatial mean of G: Grad-CAM's map `(..., h, w)`."""
  return channel_combination(features, jnp.mean(grads, axis=(-3, -2)))


def cam(features: jax.Array, class_weights: jax.Array, targets: jax.Array) -> jax.Array:
  """CAM (Zhou et al. 2016) for a global-average-pool + dense head: ReLU(sum_k W[k, t] A_k).

  `class_weights` is the dense kernel `(K, C)`. For such a head Grad-CAM's weights are
  W[k, t] / (h w) at every position, so `cam == h * w * grad_cam` exactly.
  """
  return channel_combination(features, jnp.take(class_weights, targets, axis=1).T)


def grad_cam(head_fn: HeadFn, features: jax.Array, targets: jax.Array) -> jax.Array:
  """Grad-CAM maps `(N, h, w)` of class `targets[i]` for every sample i, in one VJP."""
  _, grads = head_gradients(head_fn, features, targets)
  return weighted_activation(features, grads)


def grad_cam_pp(
  head_fn: HeadFn, features: jax.Array, targets: jax.Array, eps: float = 1e-6
) -> jax.Array:
  """Grad-CAM++ maps `(N, h, w)` (Chattopadhay et al. 2018), in one VJP.

  With the exponential of the class score, the 2nd and 3rd derivatives are powers of the
  first, g = dS/dA: alpha = g^2 / (2 g^2 + sum_ij(A) g^3) (0 where g = 0), channel weights
  w_k = sum_ij alpha ReLU(g), map ReLU(sum_k w_k A_k) — pytorch-grad-cam's form and eps.
  """
  _, grads = head_gradients(head_fn, features, targets)
  a, g = at_least_float32(features), at_least_float32(grads)
  g2 = jnp.square(g)
  activation_sums = jnp.sum(a, axis=(-3, -2), keepdims=True)
  alpha = jnp.where(g != 0, g2 / (2 * g2 + activation_sums * g2 * g + eps), 0.0)
  return channel_combination(a, jnp.sum(alpha * jax.nn.relu(g), axis=(-3, -2)))


def target_probability(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Softmax probability of class `targets[i]` for each row of `logits` `(..., C)`."""
  probs = jax.nn.softmax(at_least_float32(logits), axis=-1)
  return jnp.take_along_axis(probs, targets[..., None], axis=-1)[..., 0]


def score_cam(
  logits_fn: LogitsFn,
  images: jax.Array,
  features: jax.Array,
  targets: jax.Array,
  chunk_size: int = 32,
) -> jax.Array:
  """Score-CAM maps `(N, h, w)` (Wang et al. 2020): no gradients, K masked forward passes.

  Channel k's map, upsampled to the image size and min-max normalised to [0, 1], masks
  the images `(N, H, W, C)` (`images * mask`, so `images` should be in the space where 0
  means "removed", e.g. [0, 1] pixels with `logits_fn` normalising); its weight is the
  softmax probability of the target class for the masked image. `chunk_size` channels of
  all N images go through `logits_fn` per call (`N * chunk_size` images), in a `lax.map`
  over the chunks, so memory is bounded whatever K.
  """
  n, h, w, k = features.shape
  chunk = max(1, min(chunk_size, k))
  n_chunks = -(-k // chunk)
  a = at_least_float32(features)
  padded = jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, n_chunks * chunk - k)))
  chunks = padded.reshape(n, h, w, n_chunks, chunk).transpose(3, 0, 4, 1, 2)

  def chunk_scores(maps):  # (N, chunk, h, w) -> (N, chunk)
    masks = normalize_cam(upsample_cam(maps, images.shape[1:3])).astype(images.dtype)
    masked = images[:, None] * masks[..., None]
    logits = logits_fn(masked.reshape((n * chunk,) + images.shape[1:]))
    return target_probability(logits.reshape(n, chunk, -1), targets[:, None])

  scores = jax.lax.map(chunk_scores, chunks)  # (n_chunks, N, chunk)
  weights = scores.transpose(1, 0, 2).reshape(n, n_chunks * chunk)[:, :k]
  return channel_combination(a, weights)


def class_sums(
  values: jax.Array, labels: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
  """Per-class sums of `values` `(N, ...)` and the class counts `(C,)`, by
  `jax.ops.segment_sum` on the labels. Under `jit` over a sharded batch the sums are over
  the global batch; sums of several batches add up to those of their union."""
  values = at_least_float32(values)
  counts = jax.ops.segment_sum(jnp.ones(labels.shape, values.dtype), labels, num_classes)
  return jax.ops.segment_sum(values, labels, num_classes), counts


def batch_cam_from_sums(
  feature_sums: jax.Array, grad_sums: jax.Array, counts: jax.Array
) -> jax.Array:
  """Batch-CAM maps `(C, h, w)` from per-class sums of A and G and the class counts.

  A_bar_c = sum A / N_c and G_bar_c = sum G / N_c (eqs. 4-5; zero for absent classes),
  alpha_c = spatial mean of G_bar_c (eq. 6), M_c = ReLU(sum_k alpha_ck A_bar_ck).
  """
  scale = (1.0 / jnp.maximum(counts, 1.0)).reshape((-1,) + (1,) * (feature_sums.ndim - 1))
  return weighted_activation(feature_sums * scale, grad_sums * scale)


def batch_cam_from_gradients(
  features: jax.Array, grads: jax.Array, labels: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
  """Batch-CAM from the batch's features A and their gradients G: (cams `(C, h, w)`,
  counts `(C,)`)."""
  feature_sums, counts = class_sums(features, labels, num_classes)
  grad_sums, _ = class_sums(grads, labels, num_classes)
  return batch_cam_from_sums(feature_sums, grad_sums, counts), counts


def batch_cam(
  head_fn: HeadFn, features: jax.Array, labels: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
  """Class-averaged Grad-CAM of a batch: (cams `(C, h, w)`, counts `(C,)`)."""
  _, grads = head_gradients(head_fn, features, labels)
  return batch_cam_from_gradients(features, grads, labels, num_classes)


def normalize_cam(maps: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Per-map min-max scaling of `(..., h, w)` maps to [0, 1]; a constant map gives zeros."""
  low = jnp.min(maps, axis=(-2, -1), keepdims=True)
  high = jnp.max(maps, axis=(-2, -1), keepdims=True)
  return (maps - low) / jnp.maximum(high - low, eps)


def upsample_cam(maps: jax.Array, size: int | tuple[int, int]) -> jax.Array:
  """Bilinear resize of `(..., h, w)` maps to `size` (the prototypes' resolution)."""
  size = (size, size) if isinstance(size, int) else tuple(size)
  return jax.image.resize(maps, maps.shape[:-2] + size, method='bilinear')
