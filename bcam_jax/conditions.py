"""The training conditions of the Batch-CAM paper, defined once for configs, grids and reports.

A condition fixes the loss: cross-entropy alone (``baseline``) or cross-entropy plus a CAM
term, the per-image Prototype Loss (``proto``, eq. 11) or the Batch-CAM Prototype Loss
(``bcpl``, eq. 12), with the map distance that compares the CAM with the prototype (``l1``,
``l2``, ``ssim``) and the default weight of that term. Its name, e.g. ``bcpl-l1``, is the
one grids, results tables and evaluation reports use. The model's head and pooling are not
part of a condition; `describe` appends them to the name of a run. An ablation
(``ABLATIONS``, not in the paper's tables) is a CAM condition whose CAM gradient G is held
constant in the loss (config.loss.cam_gradient='through_features'), e.g.
``bcpl-l1-through_features``: a name, a cell and a results row of its own.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from bcam_jax import objective
from bcam_jax.models import ModelSpec
from bcam_jax.models.heads import HeadKind
from bcam_jax.objective import LossKind, Objective

BASELINE = 'baseline'


@dataclasses.dataclass(frozen=True)
class Condition:
  """A loss of the paper: `loss` is config.loss.kind and `metric` config.loss.metric.

  The baseline's metric does not change its training, only the distance with which
  evaluation measures its prototype losses; None leaves the config's. `cam_gradient` is
  config.loss.cam_gradient ('full' for the baseline, which has no CAM term).
  """

  loss: LossKind
  metric: str | None = None
  cam_gradient: str = 'full'

  def __post_init__(self):
    object.__setattr__(self, 'loss', LossKind(self.loss))  # a config's string, typed

  @property
  def name(self) -> str:
    if not self.loss.has_cam_term:
      return BASELINE
    suffix = '' if self.cam_gradient == 'full' else f'-{self.cam_gradient}'
    return f'{self.loss}-{self.metric}{suffix}'

  @property
  def lambda_cam(self) -> float | None:
    """Default CAM-term weight (lambda_class = 1). proto averages over images where bcpl
    sums over the classes of the batch, so bcpl's 0.1 gives each class about the weight
    that proto's 1 does (the choice is measured in bench/README.md, lambda sweep)."""
    return {LossKind.PROTO: 1.0, LossKind.BCPL: 0.1}.get(self.loss)


# In the paper's table order.
CONDITIONS = {
  c.name: c
  for c in [Condition(LossKind.CE)]
  + [
    Condition(kind, metric)
    for kind in (LossKind.PROTO, LossKind.BCPL)
    for metric in objective.METRICS
  ]
}
# The CAM conditions trained through the features A alone (G constant), in the same order.
ABLATIONS = {
  c.name: c
  for c in (
    Condition(kind, metric, 'through_features')
    for kind in (LossKind.PROTO, LossKind.BCPL)
    for metric in objective.METRICS
  )
}
NAMES = (*CONDITIONS, *ABLATIONS)


def get(name: str) -> Condition:
  """The condition or ablation called `name`; a clear error lists the valid names."""
  if name not in NAMES:
    raise ValueError(f'condition {name!r} is not valid; choose one of {NAMES}.')
  return CONDITIONS.get(name) or ABLATIONS[name]


def of_loss(loss: Objective) -> Condition:
  """The condition that an objective trains."""
  if not LossKind(loss.kind).has_cam_term:
    return Condition(LossKind.CE)
  return Condition(loss.kind, loss.metric, loss.cam_gradient)


def apply(config: ml_collections.ConfigDict, condition: Condition) -> ml_collections.ConfigDict:
  """Sets `config.loss` to `condition`: kind, metric (unless None), CAM gradient and
  default lambda_cam."""
  config.loss.kind = condition.loss.value
  config.loss.cam_gradient = condition.cam_gradient
  if condition.metric is not None:
    config.loss.metric = condition.metric
  if condition.lambda_cam is not None:
    config.loss.lambda_cam = condition.lambda_cam
  return config


def with_loss(kind: LossKind) -> tuple[Condition, ...]:
  """The conditions whose loss is `kind` (e.g. `LossKind.BCPL`), in table order."""
  return tuple(c for c in CONDITIONS.values() if c.loss is LossKind(kind))


def describe(loss: Objective, model: ModelSpec) -> str:
  """A run's condition and model variant in a few words, e.g. 'bcpl-l1',
  'baseline softcam l1=2e-05', 'baseline ca_stream frozen'; Soft-CAM lambdas of the
  ElasticNet's 'mean' form (not the paper's 'sum') carry ' (mean)'."""
  text = of_loss(loss).name
  kind = HeadKind(model.head, model.pooling)
  if kind.evidence:
    lambdas = [(k, getattr(loss, f'lambda_{k}')) for k in ('l1', 'l2')]
    lambdas = [f' {k}={value:g}' for k, value in lambdas if value]
    mean = lambdas and loss.elastic_net_reduction == 'mean'
    text += ' softcam' + ''.join(lambdas) + (' (mean)' if mean else '')
  if kind.attention:
    text += ' ca_stream' + (' frozen' if model.freeze_backbone else '')
  return text


def loss_formula(loss: Objective) -> str:
  """An objective as a formula, e.g. '1.0 * ce + 0.1 * bcpl-l1'."""
  if not LossKind(loss.kind).has_cam_term:
    return 'ce'
  return f'{loss.lambda_class} * ce + {loss.lambda_cam} * {of_loss(loss).name}'
