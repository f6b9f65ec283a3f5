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

from bcam_jax import cam, data, losses


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


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                 image_size: int) -> Callable[[], TrainState]:
  """A function creating the initial train state, to be jitted with replicated outputs."""
  def init() -> TrainState:
    params_key, dropout_key = jax.random.split(jax.random.key(seed))
    x = jnp.zeros((1, image_size, image_size, 1), jnp.float32)
    variables = model.init({'params': params_key, 'dropout': dropout_key}, x, train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(params))
  return init


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a train step minimises: lambda_class * CE + lambda_cam * CAM term (eqs. 11-12).

  kind: 'ce' (no CAM term), 'proto' (per-image Prototype Loss) or 'bcpl' (Batch-CAM
  Prototype Loss); metric: the map distance ('l1', 'l2', 'ssim'). CAM maps are upsampled
  to `image_size` (the prototypes' resolution) and min-max normalised before comparison.
  """
  kind: str = 'ce'
  metric: str = 'l1'
  lambda_class: float = 1.0
  lambda_cam: float = 1.0
  num_classes: int = 10
  image_size: int = 28

  @classmethod
  def from_config(cls, config, num_classes: int) -> 'Objective':
    return cls(kind=config.loss.kind, metric=config.loss.metric,
               lambda_class=config.loss.lambda_class, lambda_cam=config.loss.lambda_cam,
               num_classes=num_classes, image_size=config.data.image_size)

  def compare(self, maps: jax.Array) -> jax.Array:
    """CAM maps at feature resolution -> [0, 1] maps at the prototypes' resolution."""
    return cam.normalize_cam(cam.upsample_cam(maps, self.image_size))

  def cam_term(self, features, grads, labels, prototypes) -> jax.Array:
    """The explanation regulariser of `kind` for a batch (0 for 'ce')."""
    if self.kind == 'proto':
      maps = self.compare(cam.weighted_activation(features, grads))
      return losses.prototype_loss(maps, labels, prototypes, self.metric)
    if self.kind == 'bcpl':
      cams, counts = cam.batch_cam_from_gradients(features, grads, labels, self.num_classes)
      return losses.batch_cam_loss(self.compare(cams), counts, prototypes, self.metric)
    return jnp.zeros((), jnp.float32)

  def total(self, ce: jax.Array, cam_term: jax.Array) -> jax.Array:
    if self.kind == 'ce':
      return ce
    return self.lambda_class * ce + self.lambda_cam * cam_term


def _head_fn(model: nn.Module, variables) -> Callable[[jax.Array], jax.Array]:
  """The model's per-sample head as a pure function of the CAM-layer features."""
  return lambda features: model.apply(variables, features, method='head')


def make_loss_fn(model: nn.Module, objective: Objective):
  """(params, batch_stats, x, labels, prototypes, rng) -> (total loss, aux).

  The CAM term depends on the parameters through the features A and through the
  gradients G = dS/dA of the head, so differentiating this function goes second order
  through the head. aux holds logits, new BatchNorm statistics, CE and the CAM term.
  """

  def loss_fn(params, batch_stats, x, labels, prototypes, rng):
    variables = model_variables(params, batch_stats)
    features, updates = model.apply(variables, x, train=True, mutable=['batch_stats'],
                                    rngs={'dropout': rng}, method='backbone')
    head = _head_fn(model, variables)
    if objective.kind == 'ce':
      logits = head(features['cam'])
      cam_term = jnp.zeros((), jnp.float32)
    else:
      logits, grads = cam.head_gradients(head, features['cam'], labels)
      cam_term = objective.cam_term(features['cam'], grads, labels, prototypes)
    ce = losses.cross_entropy(logits, labels).mean()
    aux = {'logits': logits, 'batch_stats': updates.get('batch_stats', {}), 'ce': ce,
           'cam': cam_term}
    return objective.total(ce, cam_term), aux

  return loss_fn


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, objective: Objective, *, mean: float,
                    std: float, dtype: jnp.dtype, seed: int):
  """(state, images uint8, labels, prototypes) -> (new state, metrics); the dropout key
  is fold_in(seed, step), so a resumed run draws exactly the same randomness."""
  base_key = jax.random.key(seed + 1)
  loss_fn = make_loss_fn(model, objective)

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
                 prototypes: jax.Array):
    x = data.preprocess(images, mean, std, objective.image_size, dtype)
    rng = jax.random.fold_in(base_key, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, x, labels, prototypes, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1,
                           params=optax.apply_updates(state.params, updates),
                           batch_stats=aux['batch_stats'], opt_state=opt_state)
    metrics = {
        'loss': loss,
        'ce': aux['ce'],
        'cam': aux['cam'],
        'accuracy': jnp.mean(jnp.argmax(aux['logits'], -1) == labels),
        'grad_norm': optax.tree.norm(grads),
        'learning_rate': schedule(state.step),
    }
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, objective: Objective, *, mean: float, std: float,
                   dtype: jnp.dtype):
  """(variables, images, labels, mask, prototypes) -> masked sums over the batch.

  Besides CE and accuracy, every evaluation measures both explanation terms against
  `prototypes` (whatever the training objective): the per-image Prototype Loss as a sum,
  and the per-class sums of features A and gradients G, from which the caller forms the
  Batch-CAM of the whole split. Padding (mask False) is never counted.
  """

  def eval_step(variables, images, labels, mask, prototypes):
    x = data.preprocess(images, mean, std, objective.image_size, dtype)
    features = model.apply(variables, x, train=False, method='backbone')['cam']
    logits, grads = cam.head_gradients(_head_fn(model, variables), features, labels)
    mask = mask.astype(jnp.float32)
    maps = objective.compare(cam.weighted_activation(features, grads))
    proto = losses.map_distance(maps, prototypes[labels], objective.metric)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    n, m = objective.num_classes, mask[:, None, None, None]
    feature_sums, _ = cam.class_sums(features * m, labels, n)
    grad_sums, _ = cam.class_sums(grads * m, labels, n)
    return {
        'loss_sum': jnp.sum(losses.cross_entropy(logits, labels) * mask),
        'correct': jnp.sum(correct * mask),
        'proto_sum': jnp.sum(proto * mask),
        'count': jnp.sum(mask),
        'class_count': jax.ops.segment_sum(mask, labels, n),
        'class_feature_sums': feature_sums,
        'class_grad_sums': grad_sums,
    }

  return eval_step
