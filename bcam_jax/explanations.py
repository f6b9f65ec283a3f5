"""The explanation a training objective compares with the prototypes, per model kind.

A model with the default head is explained by Grad-CAM (features A and head gradients G);
a Soft-CAM model by its evidence map of the label, E_y, computed in the forward pass. Both
give per-image maps, per-class sums over a (masked) batch and class maps from those sums,
so the Prototype Loss, the Batch-CAM Prototype Loss and their validation read the same
for both.
"""

import dataclasses

import jax
import jax.numpy as jnp

from bcam_jax import cam, models
from bcam_jax.models import heads


@dataclasses.dataclass(frozen=True)
class GradCamExplanation:
  """Grad-CAM of the label: A `(N, h, w, K)` and G = dS_y/dA."""

  features: jax.Array
  grads: jax.Array

  def image_maps(self) -> jax.Array:
    return cam.weighted_activation(self.features, self.grads)

  def class_sums(self, labels, num_classes: int, weights) -> dict[str, jax.Array]:
    """Per-class sums of A and G, each sample weighted by `weights` `(N,)`."""
    w = weights[:, None, None, None]
    return {
      'features': cam.class_sums(self.features * w, labels, num_classes)[0],
      'grads': cam.class_sums(self.grads * w, labels, num_classes)[0],
    }

  @staticmethod
  def maps_from_sums(sums, counts) -> jax.Array:
    """Batch-CAM `(C, h, w)` (eqs. 4-6) from the class sums."""
    return cam.batch_cam_from_sums(sums['features'], sums['grads'], counts)


@dataclasses.dataclass(frozen=True)
class EvidenceExplanation:
  """Soft-CAM's evidence map of the label, E_y `(N, h, w)`; maps are ReLU(E_y)."""

  maps: jax.Array

  def image_maps(self) -> jax.Array:
    return jax.nn.relu(cam.at_least_float32(self.maps))

  def class_sums(self, labels, num_classes: int, weights) -> dict[str, jax.Array]:
    return {'evidence': cam.class_sums(self.maps * weights[:, None, None], labels, num_classes)[0]}

  @staticmethod
  def maps_from_sums(sums, counts) -> jax.Array:
    """ReLU of the class-mean evidence of the label `(C, h, w)` (zero for absent classes)."""
    scale = 1.0 / jnp.maximum(counts, 1.0)
    return jax.nn.relu(sums['evidence'] * scale[:, None, None])


def explanation_type(model) -> type:
  return EvidenceExplanation if model.head_type == 'softcam' else GradCamExplanation


def logits_and_explanation(model, variables, features: dict, labels, explain: bool):
  """(logits `(N, C)`, explanation of the labels or None, Soft-CAM evidence `(N, h, w, C)`
  or None) from the backbone's features; one VJP of the head for Grad-CAM."""
  a = features['cam']
  if model.head_type == 'softcam':
    evidence = model.apply(variables, a, method='evidence')
    return (
      jnp.mean(evidence, axis=(1, 2)),
      EvidenceExplanation(heads.select_class(evidence, labels)),
      evidence,
    )
  head = models.head_fn(model, variables, features)
  if not explain:
    return head(a), None, None
  logits, grads = cam.head_gradients(head, a, labels)
  return logits, GradCamExplanation(a, grads), None
