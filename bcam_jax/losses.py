"""Training objectives: cross-entropy and the Batch-CAM paper's explanation terms.

    L_total = lambda_class * CE + lambda_cam * L_reg                    (paper eqs. 11-12)

with L_reg the per-image Prototype Loss (`proto`) or the Batch-CAM Prototype Loss
(`bcpl`), each measured by a map distance phi in {l1, l2, ssim} between [0, 1] maps; and
Soft-CAM's ElasticNet penalty on class-evidence maps.
"""

import dm_pix
import jax
import jax.numpy as jnp
import optax

from bcam_jax import cam

METRICS = ('l1', 'l2', 'ssim')
LOSS_KINDS = ('ce', 'proto', 'bcpl')


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels, in float32 at least."""
  return optax.softmax_cross_entropy_with_integer_labels(cam.at_least_float32(logits), labels)


def map_distance(maps: jax.Array, targets: jax.Array, metric: str) -> jax.Array:
  """phi(M, P) per map for `(..., H, W)` maps in [0, 1]: mean |M-P| (l1), mean (M-P)^2
  (l2) or 1 - SSIM (ssim; dm_pix, 11x11 Gaussian window, data range 1)."""
  if metric == 'l1':
    return jnp.mean(jnp.abs(maps - targets), axis=(-2, -1))
  if metric == 'l2':
    return jnp.mean(jnp.square(maps - targets), axis=(-2, -1))
  if metric == 'ssim':
    size = min(11, maps.shape[-1], maps.shape[-2])
    return 1.0 - dm_pix.ssim(maps[..., None], targets[..., None], max_val=1.0, filter_size=size)
  raise ValueError(f'metric={metric!r}; valid: {METRICS}')


def prototype_loss(
  maps: jax.Array, labels: jax.Array, prototypes: jax.Array, metric: str
) -> jax.Array:
  """Prototype Loss: mean over the batch of phi(M_i, P_{y_i}); maps `(N, H, W)` in [0, 1]
  at the prototypes' resolution, prototypes `(C, H, W)`."""
  return jnp.mean(map_distance(maps, prototypes[labels], metric))


def batch_cam_loss(
  cams: jax.Array, counts: jax.Array, prototypes: jax.Array, metric: str
) -> jax.Array:
  """Batch-CAM Prototype Loss (eq. 12): sum over the classes present in the batch
  (count > 0) of phi(M_c, P_c); cams `(C, H, W)` in [0, 1]."""
  present = (counts > 0).astype(cams.dtype)
  return jnp.sum(present * map_distance(cams, prototypes, metric))


def elastic_net(evidence: jax.Array, lambda_l1: float, lambda_l2: float) -> jax.Array:
  """Soft-CAM's ElasticNet on class-evidence maps: lambda_l1 mean|E| + lambda_l2 mean(E^2),
  means over every sample, position and class (dense: both 0; sparse: l1 > 0; ridge:
  l2 > 0)."""
  e = cam.at_least_float32(evidence)
  return lambda_l1 * jnp.mean(jnp.abs(e)) + lambda_l2 * jnp.mean(jnp.square(e))
