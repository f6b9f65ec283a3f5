"""Linen models of a user's own, imported by train.py and eval.py by path in tests:
`--config.model.name=tests.user_models:UserNet --config.model.cam_layer=conv2`."""

import flax.linen as nn


class UserNet(nn.Module):
  """conv -> conv (the CAM layer 'conv2') -> BatchNorm -> dropout -> mean pool -> dense; its
  output an object with `.logits`, as HuggingFace's models return."""

  num_classes: int
  width: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(self.width, (3, 3), name='conv1')(x))
    x = nn.Conv(2 * self.width, (3, 3), strides=2, name='conv2')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name='bn')(x))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return Output(nn.Dense(self.num_classes, name='head')(x.mean((1, 2))))


class Output:
  def __init__(self, logits):
    self.logits = logits


NOT_A_MODULE = 3
