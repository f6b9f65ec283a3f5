"""The jitted computations of a run: train state, train step and masked eval step.

Images arrive as uint8 batches sharded over the `data` axis; normalisation and resizing to
`image_size` happen here, on device. Reductions over the batch (loss, BatchNorm
statistics) are over the global batch, so results do not depend on the device count.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from bcam_jax import data, losses


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


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, mean: float, std: float,
                    image_size: int, dtype: jnp.dtype, seed: int):
  """(state, images uint8, labels) -> (new state, metrics); the dropout key is
  fold_in(seed, step), so a resumed run draws exactly the same randomness."""
  base_key = jax.random.key(seed + 1)

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
    x = data.preprocess(images, mean, std, image_size, dtype)
    rng = jax.random.fold_in(base_key, state.step)

    def loss_fn(params):
      (logits, _), updates = model.apply(
          model_variables(params, state.batch_stats), x, train=True,
          mutable=['batch_stats'], rngs={'dropout': rng})
      loss = losses.cross_entropy(logits, labels).mean()
      return loss, (logits, updates.get('batch_stats', {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1,
                           params=optax.apply_updates(state.params, updates),
                           batch_stats=batch_stats, opt_state=opt_state)
    metrics = {
        'loss': loss,
        'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
        'grad_norm': optax.tree.norm(grads),
        'learning_rate': schedule(state.step),
    }
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, *, mean: float, std: float, image_size: int,
                   dtype: jnp.dtype):
  """(variables, images, labels, mask) -> masked sums, so padding is never counted."""

  def eval_step(variables, images, labels, mask):
    x = data.preprocess(images, mean, std, image_size, dtype)
    logits, _ = model.apply(variables, x, train=False)
    mask = mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {
        'loss_sum': jnp.sum(losses.cross_entropy(logits, labels) * mask),
        'correct': jnp.sum(correct * mask),
        'count': jnp.sum(mask),
    }

  return eval_step
