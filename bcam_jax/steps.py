"""The jitted computations of a run: train state, train step and masked eval step.

Images arrive as uint8 batches sharded over the `data` axis; normalisation and resizing to
`image_size` happen here, on device. Reductions over the batch (loss, BatchNorm
statistics, Batch-CAM's per-class sums) are over the global batch, so results do not
depend on the device count.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from bcam_jax import cam, data, explanations, losses


class TrainState(struct.PyTreeNode):
  """Everything a resumed run needs; the step also seeds the per-step dropout key."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  def model_variables(self) -> dict[str, Any]:
    return model_variables(self.params, self.batch_stats)


def model_variables(params, batch_stats) -> dict[str, Any]:
  """The `variables` argument of `model.apply` (no batch_stats for models without BN)."""
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  return variables


def make_init_fn(
  model: nn.Module, tx: optax.GradientTransformation, seed: int, image_size: int
) -> Callable[[], TrainState]:
  """A function creating the initial train state, to be jitted with replicated outputs.

  Parameters and BatchNorm statistics are float32, or float64 for a model computing in
  float64 (64-bit JAX): the same values, so a float64 run is the float32 run without its
  rounding.
  """
  variable_dtype = jnp.promote_types(model.dtype, jnp.float32)

  def init() -> TrainState:
    params_key, dropout_key = jax.random.split(jax.random.key(seed))
    x = jnp.zeros((1, image_size, image_size, 1), jnp.float32)
    variables = model.init({'params': params_key, 'dropout': dropout_key}, x, train=False)
    variables = jax.tree.map(lambda v: v.astype(variable_dtype), variables)
    params = variables['params']
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
    )

  return init


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a train step minimises:

      lambda_class * CE + lambda_cam * CAM term (eqs. 11-12)
                        + lambda_l1 * mean|E| + lambda_l2 * mean(E^2)  (Soft-CAM ElasticNet)

  kind: 'ce' (no CAM term), 'proto' (per-image Prototype Loss) or 'bcpl' (Batch-CAM
  Prototype Loss); metric: the map distance ('l1', 'l2', 'ssim'). The explanation is
  Grad-CAM, or for a Soft-CAM model its evidence map of the label; maps are upsampled to
  `image_size` (the prototypes' resolution) and min-max normalised before comparison.
  The ElasticNet term applies to Soft-CAM evidence maps E only.
  """

  kind: str = 'ce'
  metric: str = 'l1'
  lambda_class: float = 1.0
  lambda_cam: float = 1.0
  num_classes: int = 10
  image_size: int = 28
  lambda_l1: float = 0.0
  lambda_l2: float = 0.0

  @classmethod
  def from_config(cls, config, num_classes: int) -> 'Objective':
    return cls(
      kind=config.loss.kind,
      metric=config.loss.metric,
      lambda_class=config.loss.lambda_class,
      lambda_cam=config.loss.lambda_cam,
      num_classes=num_classes,
      image_size=config.data.image_size,
      lambda_l1=config.loss.lambda_l1,
      lambda_l2=config.loss.lambda_l2,
    )

  def compare(self, maps: jax.Array) -> jax.Array:
    """CAM maps at feature resolution -> [0, 1] maps at the prototypes' resolution."""
    return cam.normalize_cam(cam.upsample_cam(maps, self.image_size))

  def cam_term(self, explanation, labels, prototypes) -> jax.Array:
    """The explanation regulariser of `kind` for a batch (0 for 'ce')."""
    if self.kind == 'proto':
      maps = self.compare(explanation.image_maps())
      return losses.prototype_loss(maps, labels, prototypes, self.metric)
    if self.kind == 'bcpl':
      ones = jnp.ones(labels.shape, jnp.float32)
      sums = explanation.class_sums(labels, self.num_classes, ones)
      counts = cam.class_sums(ones, labels, self.num_classes)[0]
      cams = explanation.maps_from_sums(sums, counts)
      return losses.batch_cam_loss(self.compare(cams), counts, prototypes, self.metric)
    return jnp.zeros((), jnp.float32)

  def penalty(self, evidence) -> jax.Array:
    """Soft-CAM's ElasticNet on the evidence maps (0 without them)."""
    if evidence is None:
      return jnp.zeros((), jnp.float32)
    return losses.elastic_net(evidence, self.lambda_l1, self.lambda_l2)

  def total(self, ce: jax.Array, cam_term: jax.Array, penalty=0.0) -> jax.Array:
    if self.kind == 'ce':
      return ce + penalty
    return self.lambda_class * ce + self.lambda_cam * cam_term + penalty


def make_loss_fn(model: nn.Module, objective: Objective, frozen_backbone: bool = False):
  """(params, batch_stats, x, labels, prototypes, rng) -> (total loss, aux).

  The CAM term depends on the parameters through the features A and through the
  gradients G = dS/dA of the head, so differentiating this function goes second order
  through the head. aux holds logits, new BatchNorm statistics, CE, the CAM term and the
  ElasticNet penalty. With `frozen_backbone` the backbone runs in evaluation mode (its
  BatchNorm statistics stay as restored), without gradient (no backward pass through it),
  and the optimiser leaves its parameters alone.
  """

  def loss_fn(params, batch_stats, x, labels, prototypes, rng):
    variables = model_variables(params, batch_stats)
    if frozen_backbone:
      features = model.apply(variables, x, train=False, frozen=True, method='backbone')
      new_batch_stats = batch_stats
    else:
      features, updates = model.apply(
        variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': rng}, method='backbone'
      )
      new_batch_stats = updates.get('batch_stats', {})
    logits, explanation, evidence = explanations.logits_and_explanation(
      model, variables, features, labels, explain=objective.kind != 'ce'
    )
    cam_term = (
      objective.cam_term(explanation, labels, prototypes)
      if objective.kind != 'ce'
      else jnp.zeros((), jnp.float32)
    )
    penalty = objective.penalty(evidence)
    ce = losses.cross_entropy(logits, labels).mean()
    aux = {
      'logits': logits,
      'batch_stats': new_batch_stats,
      'ce': ce,
      'cam': cam_term,
      'penalty': penalty,
    }
    return objective.total(ce, cam_term, penalty), aux

  return loss_fn


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  objective: Objective,
  *,
  mean: float,
  std: float,
  dtype: jnp.dtype,
  seed: int,
  frozen_backbone: bool = False,
):
  """(state, images uint8, labels, prototypes) -> (new state, metrics); the dropout key
  is fold_in(seed, step), so a resumed run draws exactly the same randomness."""
  base_key = jax.random.key(seed + 1)
  loss_fn = make_loss_fn(model, objective, frozen_backbone)

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array, prototypes: jax.Array):
    x = data.preprocess(images, mean, std, objective.image_size, dtype)
    rng = jax.random.fold_in(base_key, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats, x, labels, prototypes, rng
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      batch_stats=aux['batch_stats'],
      opt_state=opt_state,
    )
    metrics = {
      'loss': loss,
      'ce': aux['ce'],
      'cam': aux['cam'],
      'penalty': aux['penalty'],
      'accuracy': jnp.mean(jnp.argmax(aux['logits'], -1) == labels),
      'grad_norm': optax.tree.norm(grads),
      'learning_rate': schedule(state.step),
    }
    return new_state, metrics

  return train_step


def make_eval_step(
  model: nn.Module, objective: Objective, *, mean: float, std: float, dtype: jnp.dtype
):
  """(variables, images, labels, mask, prototypes) -> masked sums over the batch.

  Besides CE and accuracy, every evaluation measures both explanation terms against
  `prototypes` (whatever the training objective): the per-image Prototype Loss as a sum,
  and the per-class sums of the explanation (A and G for Grad-CAM, the label's evidence
  for Soft-CAM), from which the caller forms the class maps of the whole split
  (`explanations.explanation_type(model).maps_from_sums`). Padding (mask False) is never
  counted.
  """

  def eval_step(variables, images, labels, mask, prototypes):
    x = data.preprocess(images, mean, std, objective.image_size, dtype)
    features = model.apply(variables, x, train=False, method='backbone')
    logits, explanation, _ = explanations.logits_and_explanation(
      model, variables, features, labels, explain=True
    )
    mask = mask.astype(jnp.float32)
    maps = objective.compare(explanation.image_maps())
    proto = losses.map_distance(maps, prototypes[labels], objective.metric)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {
      'loss_sum': jnp.sum(losses.cross_entropy(logits, labels) * mask),
      'correct': jnp.sum(correct * mask),
      'proto_sum': jnp.sum(proto * mask),
      'count': jnp.sum(mask),
      'class_count': jax.ops.segment_sum(mask, labels, objective.num_classes),
      'class_sums': explanation.class_sums(labels, objective.num_classes, mask),
    }

  return eval_step
