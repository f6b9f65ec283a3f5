"""ConvNeXt-Tiny, V1 (Liu et al., 2022) and V2 (Woo et al., 2023), for any channel count,
with a small-image stem option.

Depths 3-3-9-3, dims 96-192-384-768 (V1's ``width`` option scales them).  Block: depthwise
7x7 conv, LayerNorm, Dense 4d, GELU (exact), then V2: GRN, Dense d; V1: Dense d, layer
scale (a per-channel gamma starting at 1e-6, timm's and torchvision's ``ls_init_value``);
then stochastic depth, residual.  Stochastic depth rates grow linearly from 0 to
``drop_path_rate`` over the 18 blocks and draw on the 'dropout' rng stream;
they act only when ``train``.  Downsampling between stages: LayerNorm + 2x2
conv stride 2 (VALID, so sides halve with floor).  LayerNorms (epsilon 1e-6)
and GRN compute in at least float32 whatever the ``dtype``.

The stem is a conv + LayerNorm; ``stem_stride`` picks the conv:
4 = ImageNet patchify (4x4 stride 4, VALID); 1 or 2 = 3x3 with that stride
(padding 1, output side ceil(side / stride)).  Sizes::

    stem_stride  features   28x28 input   112x112 input  min side
    1 (default)  stem       28x28x96      112x112x96     8
                 stage1     28x28x96      112x112x96
                 stage2     14x14x192     56x56x192
                 stage3     7x7x384       28x28x384
                 stage4=cam 3x3x768       14x14x768
    2            stage4=cam 1x1x768       7x7x768        15
                 (stem/stage1 14x14, stage2 7x7, stage3 3x3 at 28)
    4            stage4=cam too small     3x3x768        32
                 (stem/stage1 28x28, stage2 14x14, stage3 7x7 at 112)

Parameters (10 classes, independent of image size): 27,870,442 with a 3x3
stem (stride 1 or 2) and 27,871,114 with the patchify stem; each block has
8d^2 + 65d.  With RGB input and 1000 classes the patchify model has
28,635,496, the published 28.6M of ConvNeXt V2-T; V1 has d fewer per block (its gamma
against GRN's 2d): 28,589,128, timm's and torchvision's ConvNeXt-T.

CA-Stream (``pooling="ca_stream"``) attends the stem and the four stage outputs (96, 96,
192, 384, 768 channels), as it attends ResNet's: 988,416 stream parameters (q_0, W_0..W_3,
W_L). The official code (ftorres11/CA_Stream, models/ConvNext/convnext_stream.py) places its
blocks by index in torchvision's list of layers instead: it attends the stem, the outputs of
the downsampling layers into stages 2 and 3 (those stages' inputs, before their blocks) and
stage 4's output. Stage 1's and stage 3's outputs are not attended, and the block meant for
the downsampling into stage 4 fails to build (its width is None) and is skipped: four blocks,
96->192, 192->384, 384->768 and W_L, 979,104 parameters for the Tiny widths. We keep the
stage outputs, the features F_l = f_l(F_{l-1}) of the paper's eq. 8-10, with the same
placement on every backbone. Every linear layer of ConvNeXt, the stream's included, starts
as truncated normal (std 0.02) with zero bias, as in the official code (``stream_init``).
"""

from functools import partial

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from bcam_jax.cam import at_least_float32
from bcam_jax.models.base import CamClassifier
from bcam_jax.models.conv import conv_module
from bcam_jax.models.heads import POOL, Pool

DEPTHS = (3, 3, 9, 3)
DIMS = (96, 192, 384, 768)
STEM_STRIDES = (1, 2, 4)
LN_EPSILON = 1e-6
# V1's layer scale starts here (timm's and torchvision's ls_init_value).
LAYER_SCALE_INIT = 1e-6

# Reference initialisation: truncated normal (std 0.02) weights, zero biases.
_WEIGHT_INIT = nn.initializers.truncated_normal(0.02)


class GRN(nn.Module):
  """Global Response Normalisation, per sample, in at least float32.

  Gx = L2 norm over (H, W) per channel, Nx = Gx / (mean over channels of Gx
  + 1e-6), out = gamma * (x * Nx) + beta + x, with gamma and beta of shape
  (1, 1, 1, C) starting at zero (so the layer starts as the identity).
  """

  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    gamma = self.param('gamma', nn.initializers.zeros, (1, 1, 1, channels))
    beta = self.param('beta', nn.initializers.zeros, (1, 1, 1, channels))
    x = at_least_float32(x)
    sum_sq = jnp.sum(jnp.square(x), axis=(1, 2), keepdims=True)
    # sqrt with gradient 0 (as torch.norm) rather than NaN at an all-zero channel.
    positive = sum_sq > 0
    gx = jnp.where(positive, jnp.sqrt(jnp.where(positive, sum_sq, 1.0)), 0.0)
    nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + 1e-6)
    return jnp.asarray(gamma * (x * nx) + beta + x, self.dtype)


class ConvNeXtBlock(nn.Module):
  """ConvNeXt block with stochastic depth ``drop_path`` on its residual branch: V2's GRN
  after the GELU (``version=2``), or V1's layer scale (``gamma`` `(dim,)`, starting at
  ``LAYER_SCALE_INIT``) on the branch (``version=1``)."""

  dim: int
  drop_path: float
  dtype: jnp.dtype
  conv_lowering: str = 'auto'
  version: int = 2

  @nn.compact
  def __call__(self, x, train: bool):
    y = conv_module(self.conv_lowering)(
      self.dim,
      (7, 7),
      padding=3,
      feature_group_count=self.dim,
      dtype=self.dtype,
      kernel_init=_WEIGHT_INIT,
      name='dwconv',
    )(x)
    y = nn.LayerNorm(epsilon=LN_EPSILON, use_fast_variance=False, dtype=self.dtype, name='norm')(y)
    y = nn.Dense(4 * self.dim, dtype=self.dtype, kernel_init=_WEIGHT_INIT, name='pwconv1')(y)
    y = nn.gelu(y, approximate=False)
    if self.version == 2:
      y = GRN(self.dtype, name='grn')(y)
    y = nn.Dense(self.dim, dtype=self.dtype, kernel_init=_WEIGHT_INIT, name='pwconv2')(y)
    if self.version == 1:
      gamma = self.param('gamma', nn.initializers.constant(LAYER_SCALE_INIT), (self.dim,))
      y = y * jnp.asarray(gamma, y.dtype)
    # Drop path: one Bernoulli draw per sample (mask broadcast over H, W, C), scaled by 1/keep.
    y = nn.Dropout(
      self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train, name='drop_path'
    )(y)
    return x + y


class ConvNeXtBackbone(nn.Module):
  """Stem and four stages; returns stem, stage1..stage4 and cam (= stage4)."""

  stem_stride: int
  drop_path_rate: float
  dtype: jnp.dtype
  conv_lowering: str = 'auto'
  version: int = 2
  dims: tuple[int, ...] = DIMS

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = partial(conv_module(self.conv_lowering), dtype=self.dtype, kernel_init=_WEIGHT_INIT)
    norm = partial(nn.LayerNorm, epsilon=LN_EPSILON, use_fast_variance=False, dtype=self.dtype)
    if self.stem_stride == 4:
      x = conv(self.dims[0], (4, 4), strides=4, padding='VALID', name='stem_conv')(x)
    else:
      x = conv(self.dims[0], (3, 3), strides=self.stem_stride, padding=1, name='stem_conv')(x)
    x = self.perturb('stem', norm(name='stem_norm')(x))
    features = {'stem': x}
    rates = np.linspace(0.0, self.drop_path_rate, sum(DEPTHS))
    block = 0
    for i, (depth, dim) in enumerate(zip(DEPTHS, self.dims), start=1):
      if i > 1:
        x = norm(name=f'downsample{i}_norm')(x)
        x = conv(dim, (2, 2), strides=2, padding='VALID', name=f'downsample{i}_conv')(x)
      for j in range(depth):
        x = ConvNeXtBlock(
          dim,
          float(rates[block]),
          self.dtype,
          self.conv_lowering,
          self.version,
          name=f'stage{i}_block{j + 1}',
        )(x, train)
        block += 1
      x = self.perturb(f'stage{i}', x)
      features[f'stage{i}'] = x
    features['cam'] = x
    return features


class PoolNormDenseHead(nn.Module):
  """Global average pool (or, given a query, CA-Stream's last block and W_L), LayerNorm,
  Dense, all in at least float32."""

  num_classes: int

  @nn.compact
  def __call__(self, cam, query=None):
    x = Pool(_WEIGHT_INIT, name=POOL)(cam, query)
    x = nn.LayerNorm(epsilon=LN_EPSILON, use_fast_variance=False, name='norm')(x)
    return nn.Dense(self.num_classes, kernel_init=_WEIGHT_INIT, name='dense')(x)


class ConvNeXtV2Tiny(CamClassifier):
  """ConvNeXt V2-Tiny classifier.

  Options: ``stem_stride`` (1, 2 or 4), ``drop_path_rate``, ``dtype``.
  """

  stem_stride: int = 1
  drop_path_rate: float = 0.1

  # Class attributes, not options: the block's version and the model name.
  version = 2
  model_name = 'convnext_v2_tiny'

  def __post_init__(self):
    if self.stem_stride not in STEM_STRIDES:
      raise ValueError(
        f'{self.model_name}: stem_stride must be one of {STEM_STRIDES}, got {self.stem_stride!r}'
      )
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(
        f'{self.model_name}: drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}'
      )
    super().__post_init__()

  stream_stages = ('stem', 'stage1', 'stage2', 'stage3')
  stream_init = staticmethod(_WEIGHT_INIT)

  @property
  def dims(self) -> tuple[int, ...]:
    """Channels of the four stages."""
    return DIMS

  @nn.nowrap
  def make_backbone(self):
    return ConvNeXtBackbone(
      self.stem_stride,
      self.drop_path_rate,
      self.dtype,
      self.conv_lowering,
      self.version,
      self.dims,
    )

  @nn.nowrap
  def make_head(self):
    return PoolNormDenseHead(self.num_classes)

  @nn.nowrap
  def cam_side(self, image_side: int) -> int:
    if self.stem_stride == 4:
      side = image_side // 4
    else:
      side = -(-image_side // self.stem_stride)
    return side // 2 // 2 // 2

  @nn.nowrap
  def label(self) -> str:
    return f'{self.model_name}(stem_stride={self.stem_stride})'

  @nn.nowrap
  def larger_cam_option(self) -> str | None:
    return 'stem_stride=1' if self.stem_stride > 1 else None


class ConvNeXtTiny(ConvNeXtV2Tiny):
  """ConvNeXt-Tiny (V1) classifier: the V2 model with layer scale instead of GRN.

  Options: those of ``ConvNeXtV2Tiny`` and ``width``, the channels of the first stage (96
  in ConvNeXt-T; the others are 2x, 4x and 8x it), smaller for quick tests.
  """

  width: int = 96

  version = 1
  model_name = 'convnext_tiny'

  def __post_init__(self):
    if not isinstance(self.width, int) or self.width < 1:
      raise ValueError(f'convnext_tiny: width must be a positive int, got {self.width!r}')
    super().__post_init__()

  @property
  def dims(self) -> tuple[int, ...]:
    return tuple(self.width * d // DIMS[0] for d in DIMS)
