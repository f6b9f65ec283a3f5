"""ResNets 18, 34, 50 and 101 (torchvision's v1.5 layout) for any channel count, with a
small-image stem (default) or the ImageNet stem.

Blocks per stage: [2, 2, 2, 2] (18), [3, 4, 6, 3] (34), [3, 4, 6, 3] (50), [3, 4, 23, 3]
(101); strides 1-2-2-2. ResNet-18/34 use BasicBlocks (two 3x3 convs) with stage widths
64-128-256-512; ResNet-50/101 use Bottlenecks (1x1, 3x3 with the block's stride, 1x1 with 4x
the channels: torchvision's v1.5, stride on the 3x3) with stage outputs 256-512-1024-2048.
``width`` scales every width (64 in the published models). Convs are bias-free, each followed
by BatchNorm (momentum 0.9, epsilon 1e-5, computed in float32; the option ``batch_norm``
picks its form, ``bcam_jax.models.batch_norm``), with a projection shortcut (1x1 conv with
the block's stride + BatchNorm) where the shape changes. Convs pad symmetrically as
torchvision does (3x3: 1, 7x7: 3, stem max-pool: 1); output sizes equal those of SAME padding
(ceil(side / stride)), and a stride-2 block's main path stays centred on the same pixels as
its 1x1 shortcut. BatchNorm uses no axis_name: under jit over a sharded batch its statistics
are already those of the global batch.

Sizes (every side >= 1 works; k = 512 for 18/34, 2048 for 50/101, the stages before it
1/8, 1/4, 1/2 of that, and the stem 64; at width 64)::

    stem="small" (3x3 conv stride 1, BN, ReLU; no max-pool)
    features   28x28 input   112x112 input
    stem       28x28x64      112x112x64
    stage1     28x28         112x112
    stage2     14x14         56x56
    stage3     7x7           28x28
    stage4=cam 4x4xk         14x14xk

    stem="imagenet" (7x7 conv stride 2, BN, ReLU, 3x3 max-pool stride 2)
    stem       7x7x64        28x28x64
    stage1     7x7           28x28
    stage2     4x4           14x14
    stage3     2x2           7x7
    stage4=cam 1x1xk         4x4xk          (7x7xk at 224)

Parameters of ResNet-18 (10 classes, independent of image size): 11,172,810 with the small
stem, 11,175,370 with the ImageNet stem (torchvision's 11,689,512 for 1000 classes and RGB,
less the 513,000 of its fc plus 5,130, less its 9,408-weight stem plus 576 or 3,136). With
the ImageNet stem, RGB and 1000 classes every depth has torchvision's count: 11,689,512,
21,797,672, 25,557,032 and 44,549,160.
"""

import flax.linen as nn
import jax.numpy as jnp

from bcam_jax.models import pooling
from bcam_jax.models.base import CamClassifier
from bcam_jax.models.batch_norm import BATCH_NORMS, batch_norm
from bcam_jax.models.conv import conv_module
from bcam_jax.models.heads import POOL, Pool

STEMS = ('small', 'imagenet')
WIDTH_MULTIPLIERS = (1, 2, 4, 8)  # stage widths are width * these: 64-128-256-512
STRIDES = (1, 2, 2, 2)
# Blocks per stage of each depth, and whether its blocks are Bottlenecks.
STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BOTTLENECK_DEPTHS = (50, 101)
BOTTLENECK_EXPANSION = 4

# torchvision's initialisation of conv kernels: kaiming normal, fan_out, ReLU gain.
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(dtype, lowering, features, kernel, stride, name):
  """Bias-free conv with symmetric padding kernel // 2."""
  return conv_module(lowering)(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=kernel // 2,
    use_bias=False,
    dtype=dtype,
    kernel_init=_CONV_INIT,
    name=name,
  )


def _batch_norm(variant, dtype, train, name, scale_init=nn.initializers.ones):
  """BatchNorm of form ``variant`` with torchvision's momentum and epsilon."""
  return batch_norm(
    variant, train=train, momentum=0.9, epsilon=1e-5, dtype=dtype, scale_init=scale_init, name=name
  )


class _Block(nn.Module):
  """Residual block: conv-BN layers ``layers`` (kernel, width multiple, strided) on the main
  path, ReLU between them, plus the (projected where needed) input, then ReLU. The last
  BatchNorm's scale starts at zero with ``zero_init_residual``."""

  features: int
  stride: int
  zero_init_residual: bool
  dtype: jnp.dtype
  conv_lowering: str = 'auto'
  batch_norm: str = 'flax'

  # (kernel, output channels as a multiple of `features`, takes the block's stride).
  layers = ()
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = x
    for i, (kernel, multiple, strided) in enumerate(self.layers, start=1):
      stride = self.stride if strided else 1
      y = _conv(
        self.dtype, self.conv_lowering, self.features * multiple, kernel, stride, f'conv{i}'
      )(y)
      last = i == len(self.layers)
      y = _batch_norm(
        self.batch_norm, self.dtype, train, f'bn{i}', last_scale if last else nn.initializers.ones
      )(y)
      if not last:
        y = nn.relu(y)
    out = self.features * self.expansion
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out:
      shortcut = _conv(self.dtype, self.conv_lowering, out, 1, self.stride, 'proj_conv')(x)
      shortcut = _batch_norm(self.batch_norm, self.dtype, train, 'proj_bn')(shortcut)
    return nn.relu(y + shortcut)


class BasicBlock(_Block):
  """Two 3x3 conv-BN layers (the first with the block's stride); ResNet-18 and -34."""

  layers = ((3, 1, True), (3, 1, False))


class Bottleneck(_Block):
  """1x1 conv-BN, 3x3 conv-BN with the block's stride, 1x1 conv-BN to 4x ``features``
  (torchvision's v1.5); ResNet-50 and -101."""

  layers = ((1, 1, False), (3, 1, True), (1, BOTTLENECK_EXPANSION, False))
  expansion = BOTTLENECK_EXPANSION


class ResNetBackbone(nn.Module):
  """Stem and four stages of ``STAGE_BLOCKS[depth]`` blocks; returns stem, stage1..stage4 and
  cam (= stage4)."""

  depth: int
  stem: str
  width: int
  zero_init_residual: bool
  dtype: jnp.dtype
  conv_lowering: str = 'auto'
  batch_norm: str = 'flax'

  @nn.compact
  def __call__(self, x, train: bool = False):
    widths = [self.width * m for m in WIDTH_MULTIPLIERS]
    if self.stem == 'small':
      x = _conv(self.dtype, self.conv_lowering, widths[0], 3, 1, 'stem_conv')(x)
      x = nn.relu(_batch_norm(self.batch_norm, self.dtype, train, 'stem_bn')(x))
    else:
      x = _conv(self.dtype, self.conv_lowering, widths[0], 7, 2, 'stem_conv')(x)
      x = nn.relu(_batch_norm(self.batch_norm, self.dtype, train, 'stem_bn')(x))
      x = pooling.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    x = self.perturb('stem', x)
    features = {'stem': x}
    block = Bottleneck if self.depth in BOTTLENECK_DEPTHS else BasicBlock
    stages = zip(widths, STRIDES, STAGE_BLOCKS[self.depth])
    for i, (width, stride, blocks) in enumerate(stages, start=1):
      for j in range(blocks):
        x = block(
          width,
          stride if j == 0 else 1,
          self.zero_init_residual,
          self.dtype,
          self.conv_lowering,
          self.batch_norm,
          name=f'stage{i}_block{j + 1}',
        )(x, train)
      x = self.perturb(f'stage{i}', x)
      features[f'stage{i}'] = x
    features['cam'] = x
    return features


class PoolDenseHead(nn.Module):
  """Global average pool (or, given a query, CA-Stream's last block and W_L) + Dense in at
  least float32."""

  num_classes: int

  @nn.compact
  def __call__(self, cam, query=None):
    return nn.Dense(self.num_classes, name='dense')(Pool(name=POOL)(cam, query))


class ResNet18(CamClassifier):
  """ResNet-18 classifier; ``ResNet34``, ``ResNet50`` and ``ResNet101`` differ only in
  ``depth``.

  Options: ``stem`` ("small" or "imagenet"), ``width`` (channels of the stem
  and first stage, 64 in the published ResNets; smaller for quick tests),
  ``zero_init_residual`` (start the last BatchNorm scale of each block at zero, so blocks
  start as identities), ``batch_norm`` (``BATCH_NORMS``: how BatchNorm computes and
  differentiates its training step, the values the same up to rounding; see
  ``bcam_jax.models.batch_norm``), ``dtype``.
  """

  stem: str = 'small'
  width: int = 64
  zero_init_residual: bool = False
  batch_norm: str = 'flax'

  # A class attribute, not an option: each depth is a model name of its own.
  depth = 18

  def __post_init__(self):
    name = f'resnet{self.depth}'
    if self.stem not in STEMS:
      raise ValueError(f'{name}: stem must be one of {STEMS}, got {self.stem!r}')
    if not isinstance(self.width, int) or self.width < 1:
      raise ValueError(f'{name}: width must be a positive int, got {self.width!r}')
    if self.batch_norm not in BATCH_NORMS:
      raise ValueError(f'{name}: batch_norm must be one of {BATCH_NORMS}, got {self.batch_norm!r}')
    super().__post_init__()

  stream_stages = ('stem', 'stage1', 'stage2', 'stage3')

  @nn.nowrap
  def make_backbone(self):
    return ResNetBackbone(
      self.depth,
      self.stem,
      self.width,
      self.zero_init_residual,
      self.dtype,
      self.conv_lowering,
      self.batch_norm,
    )

  @nn.nowrap
  def make_head(self):
    return PoolDenseHead(self.num_classes)

  @nn.nowrap
  def class_weights(self, params):
    if self.kind.default:
      return params['head_net']['dense']['kernel']
    return super().class_weights(params)

  @nn.nowrap
  def cam_side(self, image_side: int) -> int:
    halvings = len(STRIDES) - 1 + (2 if self.stem == 'imagenet' else 0)
    for _ in range(halvings):
      image_side = -(-image_side // 2)
    return image_side

  @nn.nowrap
  def label(self) -> str:
    return f'resnet{self.depth}(stem={self.stem!r})'

  @nn.nowrap
  def larger_cam_option(self) -> str | None:
    return "stem='small'" if self.stem == 'imagenet' else None


class ResNet34(ResNet18):
  """ResNet-34 classifier (BasicBlocks [3, 4, 6, 3]); the options of ``ResNet18``."""

  depth = 34


class ResNet50(ResNet18):
  """ResNet-50 classifier (Bottlenecks [3, 4, 6, 3]); the options of ``ResNet18``."""

  depth = 50


class ResNet101(ResNet18):
  """ResNet-101 classifier (Bottlenecks [3, 4, 23, 3]); the options of ``ResNet18``."""

  depth = 101
