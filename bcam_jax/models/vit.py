"""Vision Transformers ViT-S/16 and ViT-B/16 (Dosovitskiy et al., 2021) in timm's layout.

Patch embedding (a ``patch_size`` x ``patch_size`` conv with that stride, VALID, with bias),
a class token prepended, a learned position embedding added (no dropout), ``depth``
pre-norm blocks (x + Attention(LayerNorm(x)), then x + MLP(LayerNorm(x)); attention with one
fused qkv projection, ``heads`` heads and an output projection; MLP Dense ``mlp_dim``, exact
GELU, Dense ``hidden``), a final LayerNorm, and the classifier on the class token. Every
LayerNorm has epsilon 1e-6 (timm's) and computes in at least float32, as does the softmax.

Sizes: the patch grid has side ``image_side // patch_size`` (a ragged border is not seen);
the position embedding has one row per token, so the image size at init fixes it and the
model then takes only images of that size (a ValueError says which). ViT-S/16: hidden 384,
depth 12, 6 heads, MLP 1536; ViT-B/16: 768, 12, 12, 3072. At 224x224 the grid is 14x14 and
with RGB and 1000 classes the parameters are timm's 22,050,664 and 86,567,656.

The CAM layer (``features["cam"]``) is a patch grid ``(N, s, s, hidden)``, the class token
dropped as ``bcam_jax.explain.token_grid`` drops it. Which tokens depends on the head:

* default head (timm's: the class token after the final norm -> Dense): the logits read only
  the class token, and the final norm acts on each token alone, so the logits do not depend
  on the patch tokens after the last block at all and Grad-CAM there would be zero
  everywhere. The CAM layer is therefore the patch tokens entering the last block (the
  residual stream after block ``depth - 1``), and the head is the last block, the final norm
  and the classifier, with the class token at that point as its per-sample second input
  (``features["class_token"]``, which ``bcam_jax.models.head_fn`` passes; the last attention
  is where the class token reads the patches, as pytorch-grad-cam's target layer
  ``blocks[-1].norm1`` also assumes). The head is still per sample: attention mixes tokens
  of one image only.
* ``head="softcam"`` and ``pooling="ca_stream"`` take the grid after the last block and the
  final norm (all blocks in the backbone; the class token takes part in attention but is not
  read at the end): Soft-CAM's evidence is a 1x1 conv of that grid, whose mean over patches
  gives the logits; CA-Stream attends that grid with its query and W_L instead of a mean
  pool, then a Dense. CA-Stream crosses no earlier stage here (``stream_stages`` is empty,
  the paper's S4-S4 placement): the blocks keep one width, and their grids are not a
  hierarchy of stages as a CNN's are.

The features dict also holds ``stem`` (the patch grid after the position embedding) and
``block1``.. (each block's patch tokens as a grid), every one a perturbable layer.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bcam_jax.cam import at_least_float32
from bcam_jax.models.base import CamClassifier
from bcam_jax.models.conv import conv_module
from bcam_jax.models.resnet import PoolDenseHead

LN_EPSILON = 1e-6
CLASS_TOKEN = 'class_token'  # the features key of the default head's second input

# timm's initialisation: truncated normal (std 0.02) for linear layers and the position
# embedding, zero biases, a near-zero class token.
_WEIGHT_INIT = nn.initializers.truncated_normal(0.02)
_CLS_INIT = nn.initializers.normal(1e-6)


def _norm(dtype, name):
  return nn.LayerNorm(epsilon=LN_EPSILON, use_fast_variance=False, dtype=dtype, name=name)


def _dense(features, dtype, name):
  return nn.Dense(features, dtype=dtype, kernel_init=_WEIGHT_INIT, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with timm's fused ``qkv`` (output laid out as (3, heads,
  head_dim)) and output ``proj``; softmax in at least float32."""

  hidden: int
  heads: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    n, length, _ = x.shape
    head_dim = self.hidden // self.heads
    qkv = _dense(3 * self.hidden, self.dtype, 'qkv')(x).reshape(n, length, 3, self.heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum('nqhd,nkhd->nhqk', q, k) / math.sqrt(head_dim)
    weights = jax.nn.softmax(at_least_float32(scores), axis=-1).astype(v.dtype)
    out = jnp.einsum('nhqk,nkhd->nqhd', weights, v).reshape(n, length, self.hidden)
    return _dense(self.hidden, self.dtype, 'proj')(out)


class Mlp(nn.Module):
  """Dense ``mlp_dim``, exact GELU, Dense ``hidden`` (timm's ``fc1``, ``fc2``)."""

  hidden: int
  mlp_dim: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(_dense(self.mlp_dim, self.dtype, 'fc1')(x), approximate=False)
    return _dense(self.hidden, self.dtype, 'fc2')(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + Attention(norm1(x)), then x + Mlp(norm2(x))."""

  hidden: int
  heads: int
  mlp_dim: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    x = x + Attention(self.hidden, self.heads, self.dtype, name='attn')(
      _norm(self.dtype, 'norm1')(x)
    )
    return x + Mlp(self.hidden, self.mlp_dim, self.dtype, name='mlp')(_norm(self.dtype, 'norm2')(x))


def _grid(tokens, side):
  """Patch tokens `(N, 1 + side^2, D)` (class token first) as a grid `(N, side, side, D)`."""
  return tokens[:, 1:].reshape(tokens.shape[0], side, side, tokens.shape[-1])


class ViTBackbone(nn.Module):
  """Patch embedding, class token, position embedding and ``blocks`` blocks (then the final
  norm if ``final_norm``); returns stem, block1.. and cam, plus the class token when the
  head needs it (``final_norm`` False: the head runs the last block)."""

  patch_size: int
  hidden: int
  blocks: int
  heads: int
  mlp_dim: int
  final_norm: bool
  dtype: jnp.dtype
  conv_lowering: str = 'auto'
  model_label: str = 'vit'

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no dropout, stochastic depth or BatchNorm
    p = self.patch_size
    x = conv_module(self.conv_lowering)(
      self.hidden, (p, p), strides=p, padding='VALID', dtype=self.dtype, name='patch_embed'
    )(x)
    n, side, _, _ = x.shape
    tokens = self._positions(x.reshape(n, side * side, self.hidden), side)
    features = {'stem': self.perturb('stem', _grid(tokens, side))}
    for i in range(1, self.blocks + 1):
      tokens = Block(
        self.hidden, self.heads, self.mlp_dim, self.dtype, name=f'encoderblock_{i - 1}'
      )(tokens)
      grid = self.perturb(f'block{i}', _grid(tokens, side))
      tokens = jnp.concatenate([tokens[:, :1], grid.reshape(n, side * side, self.hidden)], axis=1)
      features[f'block{i}'] = grid
    if self.final_norm:
      tokens = _norm(self.dtype, 'norm')(tokens)
    else:
      features[CLASS_TOKEN] = tokens[:, 0]
    features['cam'] = _grid(tokens, side)
    return features

  def _positions(self, patches, side):
    """Class token prepended and the position embedding added; ValueError if the grid is
    not the one the embedding was made for."""
    length = patches.shape[1] + 1
    if self.has_variable('params', 'pos_embed'):
      made_for = self.get_variable('params', 'pos_embed').shape[1] - 1
      if made_for != length - 1:
        grid = math.isqrt(made_for)
        raise ValueError(
          f'{self.model_label}: its position embedding is for a {grid}x{grid} patch grid '
          f'({grid * self.patch_size}x{grid * self.patch_size} images), got a {side}x{side} '
          'grid; use images of the size the model was initialised (or converted) with'
        )
    cls = self.param('cls_token', _CLS_INIT, (1, 1, self.hidden))
    pos = self.param('pos_embed', _WEIGHT_INIT, (1, length, self.hidden))
    cls = jnp.broadcast_to(jnp.asarray(cls, patches.dtype), (patches.shape[0], 1, self.hidden))
    return jnp.concatenate([cls, patches], axis=1) + jnp.asarray(pos, patches.dtype)


class ClassTokenHead(nn.Module):
  """The last block, the final norm and the classifier on the class token, in at least
  float32: patch grid `(N, s, s, D)` and class token `(N, D)` -> logits."""

  num_classes: int
  heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, cam, class_token):
    cam, class_token = at_least_float32(cam), at_least_float32(class_token)
    n, h, w, d = cam.shape
    tokens = jnp.concatenate([class_token[:, None], cam.reshape(n, h * w, d)], axis=1)
    tokens = Block(d, self.heads, self.mlp_dim, cam.dtype, name='block')(tokens)
    tokens = _norm(cam.dtype, 'norm')(tokens)
    return _dense(self.num_classes, cam.dtype, 'dense')(tokens[:, 0])


class ViTS16(CamClassifier):
  """ViT-S/16 classifier; ``ViTB16`` differs in its defaults.

  Options: ``patch_size``, ``hidden`` (token width), ``depth`` (blocks), ``heads``,
  ``mlp_dim``, ``dtype``. ``hidden`` must be a multiple of ``heads``.
  """

  patch_size: int = 16
  hidden: int = 384
  depth: int = 12
  heads: int = 6
  mlp_dim: int = 1536

  model_name = 'vit_s16'

  def __post_init__(self):
    for option in ('patch_size', 'hidden', 'depth', 'heads', 'mlp_dim'):
      value = getattr(self, option)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'{self.model_name}: {option} must be a positive int, got {value!r}')
    if self.hidden % self.heads:
      raise ValueError(
        f'{self.model_name}: hidden={self.hidden} is not a multiple of heads={self.heads}'
      )
    super().__post_init__()

  stream_init = staticmethod(_WEIGHT_INIT)

  @nn.nowrap
  def make_backbone(self):
    split = self.kind.default  # the default head runs the last block
    return ViTBackbone(
      self.patch_size,
      self.hidden,
      self.depth - 1 if split else self.depth,
      self.heads,
      self.mlp_dim,
      final_norm=not split,
      dtype=self.dtype,
      conv_lowering=self.conv_lowering,
      model_label=self.label(),
    )

  @nn.nowrap
  def make_head(self):
    if self.kind.attention:
      return PoolDenseHead(self.num_classes)
    return ClassTokenHead(self.num_classes, self.heads, self.mlp_dim)

  @nn.nowrap
  def head_query(self, features):
    return features[CLASS_TOKEN] if self.kind.default else super().head_query(features)

  def head(self, cam, query=None):
    """Patch grid (and, for the default head, the class token features["class_token"];
    with CA-Stream features["ca_query"]) -> logits, per sample."""
    if self.kind.default and query is None:
      raise ValueError(
        f'{self.label()}: head() needs the class token features["class_token"] beside the '
        'patch grid; build the head function with '
        'bcam_jax.models.head_fn(model, variables, features)'
      )
    return super().head(cam, query)

  @nn.nowrap
  def cam_side(self, image_side: int) -> int:
    return image_side // self.patch_size

  @nn.nowrap
  def label(self) -> str:
    return f'{self.model_name}(patch_size={self.patch_size}, hidden={self.hidden})'


class ViTB16(ViTS16):
  """ViT-B/16 classifier: ``ViTS16`` with hidden 768, 12 heads and MLP 3072."""

  hidden: int = 768
  heads: int = 12
  mlp_dim: int = 3072

  model_name = 'vit_b16'
