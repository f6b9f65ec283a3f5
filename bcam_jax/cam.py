"""Class activation maps computed inside `jit`: CAM, Grad-CAM, Grad-CAM++, XGrad-CAM,
HiResCAM, LayerCAM, Eigen-CAM, Ablation-CAM, Score-CAM and Batch-CAM, each for a whole batch
at once.

The gradient-based methods take `head_fn`, a pure and strictly per-sample function mapping CAM-layer
features `(N, h, w, K)` to logits `(N, C)` (e.g. `lambda a: model.apply(variables, a,
method='head')`). `targets` says what is explained (`Targets`): int class indices `(N,)`, or
a per-sample callable `scores_fn(logits (N, C)) -> (N,)` (row i depending only on logits row
i), e.g. `lambda l: jax.nn.softmax(l)[:, 3]`; `target_scores` gives S_i, the target logit or
the callable's value. Because sample i's logits depend only on sample i's features, one
`jax.vjp` of S with a cotangent of ones (for indices, the one-hot cotangent of the logits)
yields

    G_i = dS_i / dA_i        for every sample i at once (paper eq. 3),

with no hooks and no per-sample loop. All functions are differentiable, including through
G (second order through the head), so they can sit inside a training loss.

Every map function returns non-negative maps `(N, h, w)` at feature resolution, in at least
float32; `upsample_cam` and `normalize_cam` bring them to image size and [0, 1]. A layer
other than the CAM layer is explained through `bcam_jax.explain.layer_features`, which builds
the matching `head_fn`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

HeadFn = Callable[[jax.Array], jax.Array]
"""The rest of the network after the explained layer: features `(N, h, w, K)` -> logits
`(N, C)`, pure and strictly per sample."""
LogitsFn = Callable[[jax.Array], jax.Array]
"""The whole network: images `(N, H, W, C)` -> logits `(N, C)`, per sample."""
Targets = jax.Array | Callable[[jax.Array], jax.Array]
"""What a map explains: int class indices `(N,)`, or a per-sample `scores_fn(logits (N, C))
-> (N,)` whose row i depends only on logits row i."""


def at_least_float32(x: jax.Array) -> jax.Array:
  """x in float32, or in its own dtype where that is wider (float64 under x64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def target_scores(logits: jax.Array, targets: Targets) -> jax.Array:
  """S `(N,)`: the logit of class `targets[i]` for indices, the callable's value otherwise."""
  if callable(targets):
    return targets(logits)
  return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def head_gradients(
  head_fn: HeadFn, features: jax.Array, targets: Targets
) -> tuple[jax.Array, jax.Array]:
  """Logits `(N, C)` and G = d target_scores / d features `(N, h, w, K)`, per sample: one
  VJP, with the one-hot cotangent of the logits for indices and a cotangent of ones on the
  callable's scores otherwise."""
  if not callable(targets):
    logits, vjp = jax.vjp(head_fn, features)
    (grads,) = vjp(jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype))
    return logits, grads

  def scores_and_logits(a):
    logits = head_fn(a)
    return targets(logits), logits

  scores, vjp, logits = jax.vjp(scores_and_logits, features, has_aux=True)
  (grads,) = vjp(jnp.ones_like(scores))
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


def grad_cam(head_fn: HeadFn, features: jax.Array, targets: Targets) -> jax.Array:
  """Grad-CAM maps `(N, h, w)` of `targets` (class `targets[i]` or the callable's score) for
  every sample i, in one VJP."""
  _, grads = head_gradients(head_fn, features, targets)
  return weighted_activation(features, grads)


def grad_cam_pp(
  head_fn: HeadFn, features: jax.Array, targets: Targets, eps: float = 1e-6
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


def xgrad_cam(
  head_fn: HeadFn, features: jax.Array, targets: Targets, eps: float = 1e-7
) -> jax.Array:
  """XGrad-CAM maps `(N, h, w)` (Fu et al. 2020), in one VJP: channel weights
  w_k = sum_ij G A / (sum_ij A + eps), the gradient averaged with the activations as
  weights; pytorch-grad-cam's form and eps."""
  _, grads = head_gradients(head_fn, features, targets)
  a, g = at_least_float32(features), at_least_float32(grads)
  weights = jnp.sum(g * a, axis=(-3, -2)) / (jnp.sum(a, axis=(-3, -2)) + eps)
  return channel_combination(a, weights)


def hires_cam(head_fn: HeadFn, features: jax.Array, targets: Targets) -> jax.Array:
  """HiResCAM maps `(N, h, w)` (Draelos & Carin 2020), in one VJP: ReLU(sum_k G_k * A_k)
  position by position, the gradient not averaged over space. For a head that is linear in
  A (flatten + dense) the map before the ReLU sums to the target logit less the bias."""
  _, grads = head_gradients(head_fn, features, targets)
  return jax.nn.relu(jnp.sum(at_least_float32(grads) * at_least_float32(features), axis=-1))


def layer_cam(head_fn: HeadFn, features: jax.Array, targets: Targets) -> jax.Array:
  """LayerCAM maps `(N, h, w)` (Jiang et al. 2021), in one VJP: ReLU(sum_k ReLU(G_k) * A_k)
  position by position, only the positive gradients counting."""
  _, grads = head_gradients(head_fn, features, targets)
  positive = jax.nn.relu(at_least_float32(grads))
  return jax.nn.relu(jnp.sum(positive * at_least_float32(features), axis=-1))


def eigen_cam(features: jax.Array) -> jax.Array:
  """Eigen-CAM maps `(N, h, w)` (Muhammad & Yeasin 2020): no targets, no gradients.

  Per image, A as an `(h w, K)` matrix, centred per channel over the positions, projected
  onto its first right singular vector (one batched SVD). The singular vector's sign is
  arbitrary, so the projection is negated where |min| > |max| (pytorch-grad-cam's
  `get_2d_projection_with_sign_correction`, Seg-Eigen-CAM eq. 13): the map's larger-magnitude
  side is positive, whatever the SVD routine returns. Then ReLU. Differentiable where the
  first singular value is simple.
  """
  n, h, w, k = features.shape
  a = at_least_float32(features).reshape(n, h * w, k)
  a = a - jnp.mean(a, axis=1, keepdims=True)
  _, _, vt = jnp.linalg.svd(a, full_matrices=False)
  projection = jnp.einsum('npk,nk->np', a, vt[:, 0])
  flip = jnp.abs(jnp.min(projection, axis=-1)) > jnp.abs(jnp.max(projection, axis=-1))
  projection = jnp.where(flip[:, None], -projection, projection)
  return jax.nn.relu(projection).reshape(n, h, w)


def target_probability(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Softmax probability of class `targets[i]` for each row of `logits` `(..., C)`."""
  probs = jax.nn.softmax(at_least_float32(logits), axis=-1)
  return jnp.take_along_axis(probs, targets[..., None], axis=-1)[..., 0]


def _repeat_targets(targets: Targets, times: int) -> Targets:
  """The targets of `N * times` rows, sample i's `times` rows in a row; a per-sample
  callable serves any rows unchanged."""
  return targets if callable(targets) else jnp.repeat(targets, times)


def _per_channel(
  chunk_scores: Callable[[jax.Array], jax.Array], k: int, chunk_size: int
) -> jax.Array:
  """Scores `(N, K)` of every channel from `chunk_scores(channels (chunk,)) -> (N, chunk)`,
  in a `lax.map` over chunks of `chunk_size` channel indices, so memory is bounded whatever
  K. The last chunk is padded with the out-of-range index K, whose scores are dropped."""
  chunk = max(1, min(chunk_size, k))
  n_chunks = -(-k // chunk)
  scores = jax.lax.map(chunk_scores, jnp.arange(n_chunks * chunk).reshape(n_chunks, chunk))
  return scores.transpose(1, 0, 2).reshape(scores.shape[1], n_chunks * chunk)[:, :k]


def score_cam(
  logits_fn: LogitsFn,
  images: jax.Array,
  features: jax.Array,
  targets: Targets,
  chunk_size: int = 32,
  channel_softmax: bool = False,
) -> jax.Array:
  """Score-CAM maps `(N, h, w)` (Wang et al. 2020): no gradients, K masked forward passes.

  Channel k's map, upsampled to the image size and min-max normalised to [0, 1], masks
  the images `(N, H, W, C)` (`images * mask`, so `images` should be in the space where 0
  means "removed", e.g. [0, 1] pixels with `logits_fn` normalising), giving score s_k of the
  masked image. By default s_k is the softmax probability of the target class (for a
  callable, its value) and the weight is s_k, as in the official Score-CAM code.
  `channel_softmax=True` is pytorch-grad-cam's ScoreCAM: s_k is the target logit (for a
  callable, its value) and the weights are the softmax of s over the K channels.
  `chunk_size` channels of all N images go through `logits_fn` per call
  (`N * chunk_size` images), in a `lax.map` over the chunks, so memory is bounded whatever K.
  """
  n, k = features.shape[0], features.shape[-1]
  a = at_least_float32(features)
  use_logits = callable(targets) or channel_softmax
  score_fn = target_scores if use_logits else target_probability

  def chunk_scores(channels):  # (chunk,) -> (N, chunk)
    chunk = channels.shape[0]
    maps = jnp.moveaxis(jnp.take(a, channels, axis=-1, mode='fill', fill_value=0), -1, 1)
    masks = normalize_cam(upsample_cam(maps, images.shape[1:3])).astype(images.dtype)
    masked = images[:, None] * masks[..., None]
    logits = logits_fn(masked.reshape((n * chunk,) + images.shape[1:]))
    scores = score_fn(logits, _repeat_targets(targets, chunk))
    return at_least_float32(scores).reshape(n, chunk)

  scores = _per_channel(chunk_scores, k, chunk_size)
  return channel_combination(a, jax.nn.softmax(scores, axis=-1) if channel_softmax else scores)


def ablation_cam(
  head_fn: HeadFn, features: jax.Array, targets: Targets, chunk_size: int = 32
) -> jax.Array:
  """Ablation-CAM maps `(N, h, w)` (Desai & Ramaswamy 2020): no gradients, K passes of the
  features through `head_fn`, channel k zeroed in pass k.

  With S the target score (`target_scores`) and S_k that with channel k ablated, channel
  k's weight is the relative drop (S - S_k) / S (0 where S = 0), pytorch-grad-cam's rule
  (which ablates with min(A) - 1e7 rather than 0 where the layer's minimum is not 0).
  `chunk_size` channels of all N samples go through `head_fn` per call
  (`N * chunk_size` feature sets), in a `lax.map` over the chunks, so memory is bounded
  whatever K.
  """
  n, h, w, k = features.shape
  scores = at_least_float32(target_scores(head_fn(features), targets))[:, None]

  def chunk_scores(channels):  # (chunk,) -> (N, chunk)
    chunk = channels.shape[0]
    ablate = channels[:, None] == jnp.arange(k)  # (chunk, K); the padding index K: none
    ablated = jnp.where(ablate[:, None, None, :], 0, features[:, None])  # (N, chunk, h, w, K)
    logits = head_fn(ablated.reshape((n * chunk, h, w, k)))
    return at_least_float32(target_scores(logits, _repeat_targets(targets, chunk))).reshape(
      n, chunk
    )

  drops = scores - _per_channel(chunk_scores, k, chunk_size)
  weights = jnp.where(scores != 0, drops / jnp.where(scores != 0, scores, 1), 0)
  return channel_combination(features, weights)


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
