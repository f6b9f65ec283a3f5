"""What a training objective compares, and how: the only module that knows both the
losses and which explanation each model kind gives.

    L_total = lambda_class * CE + lambda_cam * L_reg                    (paper eqs. 11-12)
                                + lambda_l1 * sum|E| + lambda_l2 * sum E^2     (Soft-CAM)

with L_reg the per-image Prototype Loss (`proto`) or the Batch-CAM Prototype Loss
(`bcpl`), each measured by a map distance phi in {l1, l2, ssim} between [0, 1] maps. A
model with the default head is explained by Grad-CAM (features A and head gradients G); a
Soft-CAM model by its evidence map of the label, E_y, computed in the forward pass. Both
give per-image maps, per-class sums over a (masked) batch and class maps from those sums,
so the Prototype Loss, the Batch-CAM Prototype Loss and their validation read the same
for both. The CAM term trains through A and, by default, through G as well (second order
through the head); `cam_gradient='through_features'` holds G constant in the loss instead.
"""

import dataclasses
import enum

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bcam_jax import cam, models
from bcam_jax.models import heads

METRICS = ('l1', 'l2', 'ssim')


class LossKind(enum.StrEnum):
  """The CAM term of the objective: none (`CE`), the per-image Prototype Loss (`PROTO`) or
  the Batch-CAM Prototype Loss (`BCPL`). Equal to its name as a string ('ce', ...), which
  the config holds."""

  CE = 'ce'
  PROTO = 'proto'
  BCPL = 'bcpl'

  @property
  def has_cam_term(self) -> bool:
    """Whether training compares explanations with the prototypes."""
    return self is not LossKind.CE


LOSS_KINDS = tuple(k.value for k in LossKind)
ELASTIC_NET_REDUCTIONS = ('sum', 'mean')
# How the CAM term's gradient reaches the parameters: through A and G = dS_y/dA ('full'), or
# through A alone with G held constant ('through_features': what torch.autograd.grad's
# default create_graph=False gives, so probably how the paper's code trained).
CAM_GRADIENTS = ('full', 'through_features')


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


def elastic_net(
  evidence: jax.Array, lambda_l1: float, lambda_l2: float, reduction: str = 'sum'
) -> jax.Array:
  """Soft-CAM's ElasticNet on class-evidence maps E `(N, h, w, C)` (dense: both lambdas 0;
  sparse: l1 > 0; ridge: l2 > 0).

  'sum' (the paper's, section 3.3): lambda_l1 sum|E| + lambda_l2 sum E^2 over the positions
  and classes of each image, averaged over the batch like the cross-entropy, so the
  paper's lambdas (1e-5 to 1e-3) apply whatever the batch size. 'mean': lambda_l1 mean|E| +
  lambda_l2 mean(E^2) over every image, position and class, i.e. the 'sum' penalty divided
  by h * w * C (this project's form before; its lambdas are h * w * C times the paper's).
  """
  if reduction not in ELASTIC_NET_REDUCTIONS:
    raise ValueError(f'reduction={reduction!r}; valid: {ELASTIC_NET_REDUCTIONS}')
  e = cam.at_least_float32(evidence)
  l1, l2 = jnp.abs(e), jnp.square(e)
  if reduction == 'mean':
    return lambda_l1 * jnp.mean(l1) + lambda_l2 * jnp.mean(l2)
  per_image = lambda x: jnp.sum(x.reshape(x.shape[0], -1), axis=-1)
  return jnp.mean(lambda_l1 * per_image(l1) + lambda_l2 * per_image(l2))


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

  def with_constant_gradients(self) -> 'GradCamExplanation':
    """The same explanation with G under stop_gradient: a loss of it trains only through
    the features A (config.loss.cam_gradient='through_features')."""
    return dataclasses.replace(self, grads=jax.lax.stop_gradient(self.grads))

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
  return EvidenceExplanation if model.kind.evidence else GradCamExplanation


def logits_and_explanation(model, variables, features: dict, labels, explain: bool):
  """(logits `(N, C)`, explanation of the labels or None, Soft-CAM evidence `(N, h, w, C)`
  or None) from the backbone's features; one VJP of the head for Grad-CAM."""
  a = features['cam']
  if model.kind.evidence:
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


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a train step minimises:

      lambda_class * CE + lambda_cam * CAM term (eqs. 11-12)
                        + lambda_l1 * sum|E| + lambda_l2 * sum E^2  (Soft-CAM ElasticNet)

  The explanation is Grad-CAM, or for a Soft-CAM model its evidence map of the label; maps
  are upsampled to `prototype_size` (the prototypes' resolution) and min-max normalised
  before comparison.

  Attributes:
    kind: 'ce' (no CAM term), 'proto' (per-image Prototype Loss) or 'bcpl' (Batch-CAM
      Prototype Loss).
    metric: the map distance, 'l1', 'l2' or 'ssim'.
    lambda_class: the cross-entropy's weight.
    lambda_cam: the CAM term's weight.
    num_classes: the classes (the prototypes' count).
    prototype_size: the side maps are compared at.
    lambda_l1: the ElasticNet's L1 weight, on Soft-CAM evidence maps E only.
    lambda_l2: its L2 weight.
    elastic_net_reduction: what the ElasticNet's sums run over (`elastic_net`).
    cam_gradient: 'full' differentiates the CAM term through A and through Grad-CAM's
      G = dS_y/dA; 'through_features' holds G constant (only the path through A trains). A
      Soft-CAM evidence map has no G, so it takes 'full' only.
  """

  kind: LossKind = LossKind.CE
  metric: str = 'l1'
  lambda_class: float = 1.0
  lambda_cam: float = 1.0
  num_classes: int = 10
  prototype_size: int = 28
  lambda_l1: float = 0.0
  lambda_l2: float = 0.0
  elastic_net_reduction: str = 'sum'
  cam_gradient: str = 'full'

  def __post_init__(self):
    if self.kind not in LOSS_KINDS:
      raise ValueError(f'kind={self.kind!r}; valid: {LOSS_KINDS}')
    object.__setattr__(self, 'kind', LossKind(self.kind))  # a config's string, typed
    if self.cam_gradient not in CAM_GRADIENTS:
      raise ValueError(f'cam_gradient={self.cam_gradient!r}; valid: {CAM_GRADIENTS}')

  @classmethod
  def from_config(cls, config, num_classes: int) -> 'Objective':
    return cls(
      kind=config.loss.kind,
      metric=config.loss.metric,
      lambda_class=config.loss.lambda_class,
      lambda_cam=config.loss.lambda_cam,
      num_classes=num_classes,
      prototype_size=config.data.image_size,
      lambda_l1=config.loss.lambda_l1,
      lambda_l2=config.loss.lambda_l2,
      elastic_net_reduction=config.loss.elastic_net_reduction,
      cam_gradient=config.loss.cam_gradient,
    )

  def prototype_space(self, maps: jax.Array) -> jax.Array:
    """CAM maps at feature resolution -> [0, 1] maps at the prototypes' resolution, the
    form every map distance compares."""
    return cam.normalize_cam(cam.upsample_cam(maps, self.prototype_size))

  def cam_term(self, explanation, labels, prototypes) -> jax.Array:
    """The explanation regulariser of `kind` for a batch (0 for 'ce'), differentiable as
    `cam_gradient` says."""
    if self.cam_gradient == 'through_features':
      if not isinstance(explanation, GradCamExplanation):
        raise ValueError(
          "cam_gradient='through_features' holds Grad-CAM's G constant; a Soft-CAM evidence "
          "map has no G: use cam_gradient='full'."
        )
      explanation = explanation.with_constant_gradients()
    if self.kind is LossKind.PROTO:
      maps = self.prototype_space(explanation.image_maps())
      return prototype_loss(maps, labels, prototypes, self.metric)
    if self.kind is LossKind.BCPL:
      ones = jnp.ones(labels.shape, jnp.float32)
      sums = explanation.class_sums(labels, self.num_classes, ones)
      counts = cam.class_sums(ones, labels, self.num_classes)[0]
      cams = explanation.maps_from_sums(sums, counts)
      return batch_cam_loss(self.prototype_space(cams), counts, prototypes, self.metric)
    return jnp.zeros((), jnp.float32)

  def penalty(self, evidence) -> jax.Array:
    """Soft-CAM's ElasticNet on the evidence maps (0 without them)."""
    if evidence is None:
      return jnp.zeros((), jnp.float32)
    return elastic_net(evidence, self.lambda_l1, self.lambda_l2, self.elastic_net_reduction)

  def total(self, ce: jax.Array, cam_term: jax.Array, penalty=0.0) -> jax.Array:
    if not self.kind.has_cam_term:
      return self.lambda_class * ce + penalty
    return self.lambda_class * ce + self.lambda_cam * cam_term + penalty

  def split_metrics(
    self, model, totals, prototypes: jax.Array
  ) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of a whole split from the summed outputs of `steps.make_eval_step`, and the
    split's class maps `(C, S, S)` in [0, 1].

    loss (CE) and accuracy; proto_loss, the mean per-image Prototype Loss; bcam_loss, the
    Batch-CAM Prototype Loss of the class-averaged maps of the whole split; total, the
    objective (left out under 'ce', where it equals loss). The CAM term of the objective is
    proto_loss or bcam_loss, so it has no key of its own.
    """
    counts = totals['class_counts']
    maps_from_sums = explanation_type(model).maps_from_sums
    class_maps = self.prototype_space(maps_from_sums(totals['class_sums'], counts))
    count = float(totals['count'])
    metrics = {
      'loss': float(totals['loss_sum']) / count,
      'accuracy': float(totals['correct_sum']) / count,
      'proto_loss': float(totals['proto_sum']) / count,
      'bcam_loss': float(batch_cam_loss(class_maps, counts, prototypes, self.metric)),
    }
    if self.kind.has_cam_term:
      cam_term = metrics['proto_loss' if self.kind is LossKind.PROTO else 'bcam_loss']
      metrics['total'] = float(self.total(metrics['loss'], cam_term))
    return metrics, np.asarray(class_maps)
