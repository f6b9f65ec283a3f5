"""Class activation maps computed inside `jit`: vectorised Grad-CAM and Batch-CAM.

Everything here takes `head_fn`, a pure and strictly per-sample function mapping CAM-layer
features `(N, h, w, K)` to logits `(N, C)` (e.g. `lambda a: model.apply(variables, a,
method='head')`). Because sample i's logits depend only on sample i's features, one
`jax.vjp` of `head_fn` with the one-hot targets as cotangent yields

    G_i = dS_{i, t_i} / dA_i        for every sample i at once (paper eq. 3),

with no hooks and no per-sample loop. All functions are differentiable, including through
G (second order through the head), so they can sit inside a training loss.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp

HeadFn = Callable[[jax.Array], jax.Array]


def at_least_float32(x: jax.Array) -> jax.Array:
  """x in float32, or in its own dtype where that is wider (float64 under x64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def head_gradients(head_fn: HeadFn, features: jax.Array, targets: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """Logits `(N, C)` and G = d logit[target] / d features `(N, h, w, K)`, per sample."""
  logits, vjp = jax.vjp(head_fn, features)
  (grads,) = vjp(jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype))
  return logits, grads


def weighted_activation(features: jax.Array, grads: jax.Array) -> jax.Array:
  """ReLU(sum_k alpha_k A_k) with alpha = spatial mean of G: Grad-CAM's map `(..., h, w)`."""
  alpha = jnp.mean(grads, axis=(-3, -2))
  cam = jnp.einsum('...hwk,...k->...hw', at_least_float32(features),
                   at_least_float32(alpha))
  return jax.nn.relu(cam)


def grad_cam(head_fn: HeadFn, features: jax.Array, targets: jax.Array) -> jax.Array:
  """Grad-CAM maps `(N, h, w)` of class `targets[i]` for every sample i, in one VJP."""
  _, grads = head_gradients(head_fn, features, targets)
  return weighted_activation(features, grads)


def class_sums(values: jax.Array, labels: jax.Array, num_classes: int
               ) -> tuple[jax.Array, jax.Array]:
  """Per-class sums of `values` `(N, ...)` and the class counts `(C,)`, by
  `jax.ops.segment_sum` on the labels. Under `jit` over a sharded batch the sums are over
  the global batch; sums of several batches add up to those of their union."""
  values = at_least_float32(values)
  counts = jax.ops.segment_sum(jnp.ones(labels.shape, values.dtype), labels, num_classes)
  return jax.ops.segment_sum(values, labels, num_classes), counts


def batch_cam_from_sums(feature_sums: jax.Array, grad_sums: jax.Array, counts: jax.Array
                        ) -> jax.Array:
  """Batch-CAM maps `(C, h, w)` from per-class sums of A and G and the class counts.

  A_bar_c = sum A / N_c and G_bar_c = sum G / N_c (eqs. 4-5; zero for absent classes),
  alpha_c = spatial mean of G_bar_c (eq. 6), M_c = ReLU(sum_k alpha_ck A_bar_ck).
  """
  scale = (1.0 / jnp.maximum(counts, 1.0)).reshape((-1,) + (1,) * (feature_sums.ndim - 1))
  return weighted_activation(feature_sums * scale, grad_sums * scale)


def batch_cam_from_gradients(features: jax.Array, grads: jax.Array, labels: jax.Array,
                             num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Batch-CAM from the batch's features A and their gradients G: (cams `(C, h, w)`,
  counts `(C,)`)."""
  feature_sums, counts = class_sums(features, labels, num_classes)
  grad_sums, _ = class_sums(grads, labels, num_classes)
  return batch_cam_from_sums(feature_sums, grad_sums, counts), counts


def batch_cam(head_fn: HeadFn, features: jax.Array, labels: jax.Array, num_classes: int
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
