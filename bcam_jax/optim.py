"""Optimisers and learning-rate schedules built from `config.optimizer`."""

from collections.abc import Callable

import jax
import ml_collections
import optax
from flax import traverse_util

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('constant', 'cosine', 'warmup_cosine')


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Learning rate per step: constant, cosine to zero, or linear warm-up then cosine."""
  lr = cfg.learning_rate
  if cfg.schedule == 'constant':
    return optax.constant_schedule(lr)
  if cfg.schedule == 'cosine':
    return optax.cosine_decay_schedule(lr, decay_steps=max(total_steps, 1))
  if cfg.schedule == 'warmup_cosine':
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=lr,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=0.0,
    )
  raise ValueError(f'config.optimizer.schedule={cfg.schedule!r}; valid: {SCHEDULES}')


def _decay_mask(params):
  """Weight decay on kernels only: biases and normalisation parameters are 1-D."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(
  cfg: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transformation and its schedule (the schedule is logged per step)."""
  schedule = make_schedule(cfg, total_steps)
  if cfg.name == 'sgd':
    tx = optax.chain(
      optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask),
      optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov),
    )
  elif cfg.name == 'adamw':
    tx = optax.adamw(
      schedule, b1=cfg.momentum, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_decay_mask
    )
  else:
    raise ValueError(f'config.optimizer.name={cfg.name!r}; valid: {OPTIMIZERS}')
  if cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx, schedule


def train_only(
  tx: optax.GradientTransformation, trainable: Callable[[tuple[str, ...]], bool]
) -> optax.GradientTransformation:
  """`tx` on the parameters whose key path (e.g. `('stream', 'query')`) `trainable` accepts;
  every other parameter gets a zero update (and no optimiser state), so it stays
  bit-identical."""

  def labels(params):
    return traverse_util.path_aware_map(
      lambda path, _: 'train' if trainable(path) else 'frozen', params
    )

  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
