"""Optimisers and learning-rate schedules: `OptimizerSpec` (`config.optimizer`) to optax."""

import dataclasses
from collections.abc import Callable

import jax
import optax
from flax import traverse_util

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('constant', 'cosine', 'warmup_cosine')


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """The optimiser and its learning-rate schedule. momentum is SGD's momentum (0 for none)
  and AdamW's b1; weight_decay applies to kernels only (not biases or norm scales);
  warmup_steps is the linear warm-up of 'warmup_cosine'; grad_clip_norm 0 disables
  clipping."""

  name: str = 'sgd'
  learning_rate: float = 0.05
  momentum: float = 0.9
  nesterov: bool = True
  b2: float = 0.999
  weight_decay: float = 5e-4
  schedule: str = 'warmup_cosine'
  warmup_steps: int = 100
  grad_clip_norm: float = 0.0

  @classmethod
  def from_config(cls, optimizer_config) -> 'OptimizerSpec':
    """The spec of `config.optimizer`."""
    return cls(**{f.name: optimizer_config[f.name] for f in dataclasses.fields(cls)})


def make_schedule(spec: OptimizerSpec, total_steps: int) -> optax.Schedule:
  """Learning rate per step: constant, cosine to zero, or linear warm-up then cosine."""
  lr = spec.learning_rate
  if spec.schedule == 'constant':
    return optax.constant_schedule(lr)
  if spec.schedule == 'cosine':
    return optax.cosine_decay_schedule(lr, decay_steps=max(total_steps, 1))
  if spec.schedule == 'warmup_cosine':
    warmup = min(spec.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=lr,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=0.0,
    )
  raise ValueError(f'config.optimizer.schedule={spec.schedule!r}; valid: {SCHEDULES}')


def _decay_mask(params):
  """Weight decay on kernels only: biases and normalisation parameters are 1-D."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(
  spec: OptimizerSpec, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transformation and its schedule (the schedule is logged per step)."""
  schedule = make_schedule(spec, total_steps)
  if spec.name == 'sgd':
    tx = optax.chain(
      optax.add_decayed_weights(spec.weight_decay, mask=_decay_mask),
      optax.sgd(schedule, momentum=spec.momentum or None, nesterov=spec.nesterov),
    )
  elif spec.name == 'adamw':
    tx = optax.adamw(
      schedule, b1=spec.momentum, b2=spec.b2, weight_decay=spec.weight_decay, mask=_decay_mask
    )
  else:
    raise ValueError(f'config.optimizer.name={spec.name!r}; valid: {OPTIMIZERS}')
  if spec.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(spec.grad_clip_norm), tx)
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
