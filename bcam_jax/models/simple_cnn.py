"""Our SimpleCNN: three 3x3 convs, two max-pools, a dense layer on the flattened CAM map.

The Batch-CAM paper's baseline CNN is described only as one that "flattens its features
into a vector before a fully connected layer" (section 3.2); these layers are ours, so
its Table 1 figures are for a different network of that kind.

Its head (flatten + Dense) weights every CAM position separately, so the
Grad-CAM gradients vary over space (unlike global-average-pool heads, where
they are the same at every position).

Sizes (SAME convs, 2x2 max-pools with floor; the minimum image side is 4)::

    features   28x28 input   112x112 input
    stage1     14x14x32      56x56x32     conv3x3(32)-ReLU-maxpool2
    stage2     7x7x64        28x28x64     conv3x3(64)-ReLU-maxpool2
    cam        7x7x64        28x28x64     conv3x3(64)-ReLU

Parameters (10 classes): 55,744 in the convs plus 64*h*w*10 + 10 in the head,
so 87,114 at 28x28 and 557,514 at 112x112.
"""

from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from bcam_jax.cam import at_least_float32
from bcam_jax.models import pooling
from bcam_jax.models.base import CamClassifier
from bcam_jax.models.conv import conv_module
from bcam_jax.models.heads import POOL, Pool


class SimpleCNNBackbone(nn.Module):
  """Conv stack up to the CAM layer; without BatchNorm or dropout, ``train`` changes nothing."""

  dtype: jnp.dtype
  conv_lowering: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # Same computation in training and evaluation.
    conv = partial(
      conv_module(self.conv_lowering), kernel_size=(3, 3), padding='SAME', dtype=self.dtype
    )
    max_pool = partial(pooling.max_pool, window=(2, 2), strides=(2, 2))
    stage1 = self.perturb('stage1', max_pool(nn.relu(conv(32, name='conv1')(x))))
    stage2 = self.perturb('stage2', max_pool(nn.relu(conv(64, name='conv2')(stage1))))
    cam = nn.relu(conv(64, name='conv3')(stage2))
    return {'stage1': stage1, 'stage2': stage2, 'cam': cam}


class FlattenDenseHead(nn.Module):
  """Flatten (or, given a query, CA-Stream's last block and W_L) + Dense in at least
  float32."""

  num_classes: int

  @nn.compact
  def __call__(self, cam, query=None):
    if query is None:
      x = at_least_float32(cam).reshape((cam.shape[0], -1))
    else:
      x = Pool(name=POOL)(cam, query)
    return nn.Dense(self.num_classes, name='dense')(x)


class SimpleCNN(CamClassifier):
  """The paper's baseline classifier; options: ``dtype``."""

  stream_stages = ('stage1', 'stage2')

  @nn.nowrap
  def make_backbone(self):
    return SimpleCNNBackbone(self.dtype, self.conv_lowering)

  @nn.nowrap
  def make_head(self):
    return FlattenDenseHead(self.num_classes)

  @nn.nowrap
  def cam_side(self, image_side: int) -> int:
    return image_side // 2 // 2

  @nn.nowrap
  def label(self) -> str:
    return 'simple_cnn'
