"""The jitted computations of a run: train state, train step and masked eval step.

Images arrive as uint8 batches sharded over the `data` axis; normalisation and resizing to
`image_size` happen here, on device. Reductions over the batch (loss, BatchNorm
statistics, Batch-CAM's per-class sums) are over the global batch, so results do not
depend on the device count.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from bcam_jax import data
from bcam_jax.data.augment import AugmentOptions, augment_pixels
from bcam_jax.explain.layers import LinenModel
from bcam_jax.losses import layer_gradients
from bcam_jax.models.imported import ImportedClassifier
from bcam_jax.objective import (
  GradCamExplanation,
  Objective,
  cross_entropy,
  logits_and_explanation,
  map_distance,
)

_AUGMENT_STREAM = 1  # augmentation key: fold_in(dropout key, 1), independent of dropout's


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


def make_variables_fn(
  model: nn.Module, seed: int, image_size: int, channels: int = 1
) -> Callable[[], dict]:
  """A function creating the model's initial variables for (N, image_size, image_size,
  channels) images: `params`, and `batch_stats` for a model with BatchNorm (not the zero
  `perturbations` that only explanations use).

  They are float32, or float64 for a model computing in float64 (64-bit JAX): the same
  values, so a float64 run is the float32 run without its rounding.
  """
  variable_dtype = jnp.promote_types(model.dtype, jnp.float32)

  def init_variables() -> dict:
    params_key, dropout_key = jax.random.split(jax.random.key(seed))
    x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    variables = model.init({'params': params_key, 'dropout': dropout_key}, x, train=False)
    variables = model_variables(variables['params'], variables.get('batch_stats', {}))
    return jax.tree.map(lambda v: v.astype(variable_dtype), variables)

  return init_variables


def make_init_fn(
  model: nn.Module,
  tx: optax.GradientTransformation,
  seed: int,
  image_size: int,
  channels: int = 1,
) -> Callable[[], TrainState]:
  """A function creating the initial train state (`make_variables_fn` and the optimiser
  state), to be jitted with replicated outputs."""
  init_variables = make_variables_fn(model, seed, image_size, channels)

  def init() -> TrainState:
    variables = init_variables()
    params = variables['params']
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
    )

  return init


def make_loss_fn(model: nn.Module, objective: Objective, frozen_backbone: bool = False):
  """(params, batch_stats, x, labels, prototypes, rng) -> (total loss, aux).

  The CAM term depends on the parameters through the features A and through the
  gradients G = dS/dA of the head, so differentiating this function goes second order
  through the head (unless `objective.cam_gradient` is 'through_features', which holds G
  constant). aux holds logits, new BatchNorm statistics, CE, the CAM term and the
  ElasticNet penalty. With `frozen_backbone` the backbone runs in evaluation mode (its
  BatchNorm statistics stay as restored), without gradient (no backward pass through it),
  and the optimiser leaves its parameters alone.
  """

  def forward(variables, x, labels, rng):
    """(logits, explanation of the labels or None, Soft-CAM evidence or None, batch_stats)."""
    explain = objective.kind.has_cam_term
    if isinstance(model, ImportedClassifier):
      logits, explanation, stats = _imported_forward(model, variables, x, labels, rng, explain)
      return logits, explanation, None, stats
    if frozen_backbone:
      features = model.apply(variables, x, train=False, frozen=True, method='backbone')
      new_batch_stats = variables.get('batch_stats', {})
    else:
      features, updates = model.apply(
        variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': rng}, method='backbone'
      )
      new_batch_stats = updates.get('batch_stats', {})
    logits, explanation, evidence = logits_and_explanation(
      model, variables, features, labels, explain=explain
    )
    return logits, explanation, evidence, new_batch_stats

  def loss_fn(params, batch_stats, x, labels, prototypes, rng):
    variables = model_variables(params, batch_stats)
    logits, explanation, evidence, new_batch_stats = forward(variables, x, labels, rng)
    cam_term = (
      objective.cam_term(explanation, labels, prototypes)
      if objective.kind.has_cam_term
      else jnp.zeros((), jnp.float32)
    )
    penalty = objective.penalty(evidence)
    ce = cross_entropy(logits, labels).mean()
    aux = {
      'logits': logits,
      'batch_stats': new_batch_stats,
      'ce': ce,
      'cam': cam_term,
      'penalty': penalty,
    }
    return objective.total(ce, cam_term, penalty), aux

  return loss_fn


def _imported_forward(model, variables, x, labels, rng=None, explain: bool = True):
  """(logits, Grad-CAM explanation of the labels or None, batch_stats after the pass) of a
  model by import path: one forward pass with a zero perturbation at its CAM layer and one
  backward pass (`losses.layer_gradients`); in train mode when `rng` (its dropout key) is
  given, BatchNorm statistics then updated."""
  train = rng is not None
  kwargs = {'train': train}
  if train:
    kwargs['rngs'] = {'dropout': rng}
    if 'batch_stats' in variables:
      kwargs['mutable'] = ['batch_stats']
  if not explain:
    out = model.apply(variables, x, **kwargs)
    (logits, _), updates = out if kwargs.get('mutable') else (out, {})
    return logits, None, updates.get('batch_stats', variables.get('batch_stats', {}))
  adapter = LinenModel(model)  # its output (logits, features): the logits are the first
  logits, a, grads, updates = layer_gradients(
    adapter, variables, x, labels, layer=model.layer_path(), **kwargs
  )
  stats = updates.get('batch_stats', variables.get('batch_stats', {}))
  return logits, GradCamExplanation(a, grads), stats


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  objective: Objective,
  *,
  mean: float,
  std: float,
  dtype: jnp.dtype,
  image_size: int,
  seed: int,
  frozen_backbone: bool = False,
  augment: AugmentOptions | None = None,
):
  """(state, images uint8, labels, prototypes) -> (new state, metrics); images are
  preprocessed to `image_size` on device; the dropout key is fold_in(seed, step), so a
  resumed run draws exactly the same randomness. With `augment` enabled the images are
  cropped / flipped first (`data.augment`), with a key folded from the dropout key."""
  base_key = jax.random.key(seed + 1)
  loss_fn = make_loss_fn(model, objective, frozen_backbone)

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array, prototypes: jax.Array):
    rng = jax.random.fold_in(base_key, state.step)
    if augment is not None and augment.enabled:
      pixels = augment_pixels(images, jax.random.fold_in(rng, _AUGMENT_STREAM), image_size, augment)
      x = data.normalize(pixels, mean, std, dtype)
    else:
      x = data.preprocess(images, mean, std, image_size, dtype)
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
  model: nn.Module,
  objective: Objective,
  *,
  mean: float,
  std: float,
  dtype: jnp.dtype,
  image_size: int,
):
  """(variables, prototypes, images, labels, mask) -> masked sums over the batch.

  Besides CE and accuracy, every evaluation measures both explanation terms against
  `prototypes` (whatever the training objective): the per-image Prototype Loss as a sum,
  and the per-class sums of the explanation (A and G for Grad-CAM, the label's evidence
  for Soft-CAM), from which the caller forms the class maps of the whole split
  (`Objective.split_metrics`). Padding (mask False) is never
  counted.
  """

  def eval_step(variables, prototypes, images, labels, mask):
    x = data.preprocess(images, mean, std, image_size, dtype)
    if isinstance(model, ImportedClassifier):
      logits, explanation, _ = _imported_forward(model, variables, x, labels)
    else:
      features = model.apply(variables, x, train=False, method='backbone')
      logits, explanation, _ = logits_and_explanation(
        model, variables, features, labels, explain=True
      )
    mask = mask.astype(jnp.float32)
    maps = objective.prototype_space(explanation.image_maps())
    proto = map_distance(maps, prototypes[labels], objective.metric)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {
      'loss_sum': jnp.sum(cross_entropy(logits, labels) * mask),
      'correct_sum': jnp.sum(correct * mask),
      'proto_sum': jnp.sum(proto * mask),
      'count': jnp.sum(mask),
      'class_counts': jax.ops.segment_sum(mask, labels, objective.num_classes),
      'class_sums': explanation.class_sums(labels, objective.num_classes, mask),
    }

  return eval_step
