"""Every model under every training condition, chosen by the text after the colon.

  BCAM_DATA_DIR=../shared/data python train.py \
      --config=configs/experiment.py:model=resnet18,loss=bcpl,metric=l2 \
      --workdir=runs/resnet18_bcpl_l2

The argument is comma-separated `key=value` pairs, each optional (defaults first):
  model    simple_cnn | resnet18 | convnext_v2_tiny
  loss     ce (the baseline) | proto (per-image Prototype Loss, eq. 11) |
           bcpl (Batch-CAM Prototype Loss, eq. 12); bcam_jax/conditions.py sets its weight
  metric   l1 | l2 | ssim: the distance between CAM and prototype (for ce, the one that
           evaluation reports the prototype losses with)
  head     default | softcam (class-evidence maps; sparse: --config.loss.lambda_l1=2e-5,
           ridge: --config.loss.lambda_l2=2e-5, in the paper's units: per-image sums of
           the ElasticNet, config.loss.elastic_net_reduction='sum'; on SimpleCNN at 28 px,
           7x7 positions x 10 classes, about the 0.01 of the 'mean' form that the results in
           docs/guides/reproducing.md used: 0.01 / 490)
  pooling  default | ca_stream (attention pooling; its map is `--config.eval.methods=raw_attention`)
  freeze   none | backbone (with pooling=ca_stream: train only the stream on the backbone
           and classifier of a trained baseline, --config.init_from=<baseline workdir>)
Any field can still be overridden, e.g. `--config.data.name=fashion_mnist`.

Expected (cross-entropy baseline, MNIST / Fashion-MNIST test accuracy):
  model=simple_cnn        >= 98.5% MNIST after 2 epochs, about 99.0% after 5; about 91%
                          on Fashion-MNIST
  model=resnet18          >= 99.0% MNIST after one epoch (--config.train.num_epochs=1), about
                          99.5% after 5; about 94% on Fashion-MNIST (small-image stem; the
                          ImageNet stem, --config.model.options.stem=imagenet, leaves a 1x1
                          CAM map at 28x28)
  model=convnext_v2_tiny  about 99.5% / 94% after 10 epochs (the paper's best: 99.72 /
                          94.79); at 112x112 the same network gives 14x14 maps (the
                          paper's Table 2); the patchify stem is about 16x cheaper there
                          (3x3 maps): --config.model.options.stem_stride=4
Every loss, head and pooling: test accuracy within a few tenths of the model's baseline;
proto and bcpl with a much lower test prototype / Batch-CAM loss (results.json).
"""

import ml_collections

from bcam_jax import conditions, objective
from bcam_jax.configs import base
from bcam_jax.models.heads import HEAD_TYPES, POOLINGS


def _simple_cnn(config: ml_collections.ConfigDict) -> None:
  """Three convs and a flatten/dense head."""
  config.model.name = 'simple_cnn'
  config.train.num_epochs = 5


def _resnet18(config: ml_collections.ConfigDict) -> None:
  """Small-image stem (3x3/1 conv, no max-pool), which keeps a 4x4 CAM map at 28x28."""
  config.model.name = 'resnet18'
  config.model.options.stem = 'small'
  config.optimizer.learning_rate = 0.1
  config.train.num_epochs = 5


def _convnext_v2_tiny(config: ml_collections.ConfigDict) -> None:
  """Depths 3-3-9-3 with GRN; stem stride 1 for 28x28; AdamW as the ConvNeXt papers train."""
  config.model.name = 'convnext_v2_tiny'
  config.model.options.stem_stride = 1
  config.model.options.drop_path_rate = 0.1
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.05
  config.optimizer.nesterov = False
  config.optimizer.warmup_steps = 200
  config.train.num_epochs = 10


MODELS = {'simple_cnn': _simple_cnn, 'resnet18': _resnet18, 'convnext_v2_tiny': _convnext_v2_tiny}
# Each key's choices, the default first.
CHOICES = {
  'model': tuple(MODELS),
  'loss': objective.LOSS_KINDS,
  'metric': objective.METRICS,
  'head': HEAD_TYPES,
  'pooling': POOLINGS,
  'freeze': ('none', 'backbone'),
}


def parse(arg: str | None) -> dict[str, str]:
  """`key=value,...` -> every key of CHOICES with its value (the default where not given)."""
  values = {key: choices[0] for key, choices in CHOICES.items()}
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    key, value = key.strip(), value.strip()
    if not sep or key not in CHOICES:
      raise ValueError(
        f'configs/experiment.py: {item!r} is not key=value with a key among {tuple(CHOICES)}.'
      )
    if value not in CHOICES[key]:
      raise ValueError(
        f'configs/experiment.py: {key}={value!r} is not valid; choose one of {CHOICES[key]}.'
      )
    values[key] = value
  return values


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The base config with the model, condition, head and pooling that `arg` names."""
  values = parse(arg)
  config = base.get_base_config()
  MODELS[values['model']](config)
  conditions.apply(config, conditions.Condition(values['loss'], values['metric']))
  config.model.head = values['head']
  config.model.pooling = values['pooling']
  config.model.ca_stream.freeze_backbone = values['freeze'] == 'backbone'
  return config
