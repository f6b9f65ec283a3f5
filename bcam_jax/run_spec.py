"""`RunSpec`: everything a training or evaluation run is told, as typed values.

The command line reads its ConfigDict once, here (`RunSpec.from_config`: the config
completed onto `configs/base.py`, validated, then each section as its own spec); the library
below takes the specs: `data.DataSpec`, `models.ModelSpec`, `TrainSpec`, `optim.OptimizerSpec`,
`objective.Objective` and `eval_options.EvalOptions`. A user calling `train_and_evaluate` or
`evaluate_and_report` from their own code builds a `RunSpec` by hand instead and needs no
ml_collections. `to_config` gives the config back, as `<workdir>/config.json` records it.
"""

import dataclasses

import ml_collections

from bcam_jax.config_validation import ConfigError, complete, validate_config
from bcam_jax.data import DataSpec
from bcam_jax.eval_options import EvalOptions
from bcam_jax.models import ModelSpec
from bcam_jax.objective import Objective
from bcam_jax.optim import OptimizerSpec

# Objective fields that come from the data, not from `config.loss`.
_OBJECTIVE_FROM_DATA = ('num_classes', 'prototype_size')


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """How long and in what precision a run trains, and when it logs, validates and saves.

  Attributes:
    batch_size: the global batch, split over every device.
    num_epochs: passes over the train split, where num_steps is not > 0.
    num_steps: > 0 sets the run's length in steps.
    dtype: the compute dtype of the model ('float32', 'bfloat16', 'float64').
    log_every_steps: steps between log lines.
    eval_every_steps: steps between validations; 0 validates once per epoch.
    checkpoint_every_steps: steps between saved train states.
    keep_checkpoints: the latest K train states (the best variables are kept apart).
  """

  batch_size: int = 128
  num_epochs: int = 5
  num_steps: int = -1
  dtype: str = 'float32'
  log_every_steps: int = 50
  eval_every_steps: int = 0
  checkpoint_every_steps: int = 500
  keep_checkpoints: int = 3

  @classmethod
  def from_config(cls, train_config) -> 'TrainSpec':
    """The spec of `config.train`."""
    return cls(**{f.name: train_config[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class InitSpec:
  """Where a run's weights start from besides its initialisers (`config.init`).

  pretrained: a state_dict file (.pth/.pt, .safetensors) or a `bcam-weights convert`
  directory of published weights for this model (`models.pretrained.pretrained_variables`
  says what is taken); freeze_backbone: the backbone stays as it starts (evaluation mode, no
  gradient) and only what follows it trains.
  """

  pretrained: str = ''
  freeze_backbone: bool = False

  @classmethod
  def from_config(cls, init_config) -> 'InitSpec':
    """The spec of `config.init`."""
    return cls(pretrained=init_config.pretrained, freeze_backbone=bool(init_config.freeze_backbone))


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run: its seed (initialisation, batch order, dropout), data, model, training,
  optimiser, objective (its `num_classes` and `prototype_size` are the data's class count and
  image size, set by `run_setup.setup_run`) and evaluation; eval_batch_size: images per
  validation and test step; init_from: the workdir of a trained run whose backbone and
  classifier start this one ('' for none); init: published weights to start from, and
  whether the backbone is frozen."""

  seed: int = 0
  data: DataSpec = DataSpec()
  model: ModelSpec = ModelSpec()
  train: TrainSpec = TrainSpec()
  optimizer: OptimizerSpec = OptimizerSpec()
  objective: Objective = Objective()
  evaluation: EvalOptions = EvalOptions()
  eval_batch_size: int = 500
  init_from: str = ''
  init: InitSpec = InitSpec()

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'RunSpec':
    """The spec of `config`, completed onto the base config (a config written before a
    field existed: its default) and validated (`config_validation.ConfigError`)."""
    config = complete(config)
    validate_config(config)
    try:
      evaluation = EvalOptions.from_config(config.eval)
    except ValueError as error:  # a bad value, or two fields that contradict each other
      raise ConfigError(str(error)) from None
    return cls(
      seed=config.seed,
      data=DataSpec.from_config(config.data),
      model=ModelSpec.from_config(config.model),
      train=TrainSpec.from_config(config.train),
      optimizer=OptimizerSpec.from_config(config.optimizer),
      objective=Objective.from_config(config, Objective.num_classes),  # the data's at the start
      evaluation=evaluation,
      eval_batch_size=config.eval.batch_size,
      init_from=config.init_from,
      init=InitSpec.from_config(config.init),
    )

  @classmethod
  def of(cls, spec_or_config: 'RunSpec | ml_collections.ConfigDict') -> 'RunSpec':
    """`spec_or_config` itself when a `RunSpec`, else `from_config` of it: what the public
    entry points accept."""
    if isinstance(spec_or_config, RunSpec):
      return spec_or_config
    return cls.from_config(spec_or_config)

  @property
  def normalization(self) -> str:
    """'imagenet' or 'dataset': `data.normalization` with 'auto' resolved (ImageNet's mean
    and std with pretrained weights)."""
    if self.data.normalization == 'auto':
      return 'imagenet' if self.init.pretrained else 'dataset'
    return self.data.normalization

  def to_config(self) -> ml_collections.ConfigDict:
    """The config of this spec, laid out as `configs/base.py`'s."""
    model = self.model
    loss = {
      f.name: getattr(self.objective, f.name)
      for f in dataclasses.fields(Objective)
      if f.name not in _OBJECTIVE_FROM_DATA
    }
    evaluation = dataclasses.asdict(self.evaluation)
    evaluation['methods'] = ','.join(self.evaluation.methods)
    tree = {
      'seed': self.seed,
      'model': {
        'name': model.name,
        'options': dict(model.options),
        'head': model.head,
        'pooling': model.pooling,
        'conv_lowering': model.conv_lowering,
        'ca_stream': {'freeze_backbone': model.freeze_backbone},
        'cam_layer': model.cam_layer,
      },
      'init_from': self.init_from,
      'init': dataclasses.asdict(self.init),
      'data': dataclasses.asdict(self.data),
      'train': dataclasses.asdict(self.train),
      'eval': {'batch_size': self.eval_batch_size} | evaluation,
      'optimizer': dataclasses.asdict(self.optimizer),
      'loss': loss | {'kind': str(self.objective.kind)},
    }
    return ml_collections.ConfigDict(_sorted(tree))


def _sorted(tree: dict) -> dict:
  """`tree` with the keys of every level in order, as a completed config holds them."""
  return {k: _sorted(v) if isinstance(v, dict) else v for k, v in sorted(tree.items())}
