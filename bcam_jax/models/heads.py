"""Self-explainable alternatives to global average pooling + dense, for every backbone.

Soft-CAM (Djoumessi & Berens 2025): a 1x1 convolution with one output channel per class
turns the CAM-layer features A `(N, h, w, K)` into class-evidence maps
E = A W + b `(N, h, w, C)`; the logits are their spatial mean. Because the mean is linear,
a Soft-CAM head with the weights of a trained dense layer gives exactly the logits of
GAP + dense, and E[..., t] is the explanation of class t, computed in the forward pass.

CA-Stream (Torres et al. 2024, section 3.3, eq. 10): a learnable CLS query q_0 crosses every
stage l = 0..L of the backbone. At a stage with features F `(N, h, w, d)`, the attention
over positions is a = softmax(F q / sqrt(d)) and the pooled feature CA = F^T a (no
query/key/value projections); a linear map W_l (with bias) takes it to the next stage's
width, q_{l+1} = W_l CA_l, and at the last (CAM) layer l = L a square W_L gives q_{L+1},
which replaces GAP before the classifier; a_L is the class-agnostic raw-attention
explanation. `CAStream` runs the blocks before the CAM layer (q_0 -> q_L); `Pool`, inside
every default head, runs the last block and W_L, so the head stays per-sample. A zero query
gives uniform attention, i.e. CA = GAP: with a zero q_L and an identity W_L the head is the
default GAP head.
"""

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bcam_jax.cam import at_least_float32

HEAD_TYPES = ('default', 'softcam')
POOLINGS = ('default', 'ca_stream')


@dataclasses.dataclass(frozen=True)
class HeadKind:
  """What a model's head and pooling (``config.model.head``, ``config.model.pooling``) make
  it explain with; the one place those names are compared. ValueError for an unknown name
  or a combination that does not exist."""

  head: str = 'default'
  pooling: str = 'default'

  def __post_init__(self):
    if self.head not in HEAD_TYPES:
      raise ValueError(f'head={self.head!r}; valid: {", ".join(HEAD_TYPES)}')
    if self.pooling not in POOLINGS:
      raise ValueError(f'pooling={self.pooling!r}; valid: {", ".join(POOLINGS)}')
    if self.evidence and self.attention:
      raise ValueError(
        'head="softcam" pools its evidence maps by their mean; it does not '
        'combine with pooling="ca_stream"'
      )

  @property
  def evidence(self) -> bool:
    """Soft-CAM: the head's class-evidence maps are the explanation (and the logits are
    their means), not a post-hoc Grad-CAM."""
    return self.head == 'softcam'

  @property
  def attention(self) -> bool:
    """CA-Stream: attention pooling with a query crossing the backbone's stages, whose
    raw attention is a map of its own."""
    return self.pooling == 'ca_stream'

  @property
  def default(self) -> bool:
    """The architecture's own head (global average pool + dense for our models)."""
    return not (self.evidence or self.attention)


# W_L's names in the params tree: the default heads' `Pool` submodule and its Dense.
POOL = 'pool'
STREAM_OUT = 'stream_out'

# The official code (ftorres11/CA_Stream, models/transformer.py) draws each CA block's
# projection with Xavier-uniform; its ConvNeXt overrides this with a truncated normal (std
# 0.02), as for every linear layer of ConvNeXt (`ConvNeXtV2Tiny.stream_init`).
STREAM_INIT = nn.initializers.xavier_uniform()


def query_init(key, shape, dtype=jnp.float32) -> jax.Array:
  """q_0 ~ N(1, 1) per component, as the official code's `torch.normal(ones, ones)`."""
  return 1.0 + jax.random.normal(key, shape, dtype)


def cross_attention(features: jax.Array, query: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(pooled `(N, d)`, attention `(N, h, w)`) of features `(N, h, w, d)` for a query
  `(N, d)`: a = softmax over the h*w positions of F q / sqrt(d), pooled = F^T a."""
  f = at_least_float32(features)
  n, h, w, d = f.shape
  scores = jnp.einsum('nhwd,nd->nhw', f, at_least_float32(query)) / jnp.sqrt(d)
  attention = jax.nn.softmax(scores.reshape(n, h * w), axis=-1).reshape(n, h, w)
  return jnp.einsum('nhwd,nhw->nd', f, attention), attention


class Pool(nn.Module):
  """CAM features `(N, h, w, d)` -> `(N, d)` in at least float32: global average pooling,
  or, given CA-Stream's query q_L `(N, d)`, the last CA block and its projection W_L
  (Dense d -> d with bias): q_{L+1} = W_L CA_L(q_L, F_L). W_L exists only in CA-Stream
  models; the default heads have no parameters here, so their trees are unchanged.

  Attributes:
    kernel_init: initialiser of W_L's kernel (the backbone's `stream_init`).
  """

  kernel_init: Callable = STREAM_INIT

  @nn.compact
  def __call__(self, cam, query=None):
    if query is None:
      return jnp.mean(at_least_float32(cam), axis=(1, 2))
    pooled, _ = cross_attention(cam, query)
    return nn.Dense(pooled.shape[-1], kernel_init=self.kernel_init, name=STREAM_OUT)(pooled)


class CAStream(nn.Module):
  """The stream up to the CAM layer: q_0 through the CA blocks of `stages` -> q_L, the query
  of the last block, which runs in the head (`Pool`, with W_L). With no `stages` the stream
  starts at the CAM layer (the paper's S4-S4): q_L = q_0.

  Initialisation as in the official code: q_0 ~ N(1, 1) (`query_init`), the kernels of
  W_0..W_L by `kernel_init`, W_L's too (not the identity: with q_0 ~ N(1, 1) the attention
  is not uniform, so an identity W_L would not start a frozen classifier at its GAP input
  either); biases start at zero (torch's default bias, which the official ResNet stream
  keeps, is uniform in +-1/sqrt(fan_in)).

  Attributes:
    stages: names in the features dict of the stages before the CAM layer, in order.
    kernel_init: initialiser of the kernels W_0..W_{L-1}.
  """

  stages: tuple[str, ...]
  kernel_init: Callable = STREAM_INIT

  @nn.compact
  def __call__(self, features):
    names = self.stages + ('cam',)
    first = features[names[0]]
    q0 = self.param('query', query_init, (first.shape[-1],), jnp.float32)
    q = jnp.broadcast_to(q0, (first.shape[0], first.shape[-1]))
    for name, following in zip(names[:-1], names[1:]):
      pooled, _ = cross_attention(features[name], q)
      q = nn.Dense(
        features[following].shape[-1], kernel_init=self.kernel_init, name=f'{name}_to_{following}'
      )(pooled)
    return q


class SoftCamHead(nn.Module):
  """1x1 conv class-evidence layer in at least float32; logits = spatial mean of the
  evidence."""

  num_classes: int

  def setup(self):
    self.evidence_conv = nn.Dense(self.num_classes, name='evidence')

  def evidence(self, cam):
    """Class-evidence maps `(N, h, w, C)`."""
    return self.evidence_conv(at_least_float32(cam))

  def __call__(self, cam, query=None):
    del query  # Soft-CAM pools by the mean (validated: no CA-Stream with Soft-CAM).
    return jnp.mean(self.evidence(cam), axis=(1, 2))


def select_class(evidence: jax.Array, classes: jax.Array) -> jax.Array:
  """Each sample's evidence map `(N, h, w)` of its class, from `(N, h, w, C)`."""
  return jnp.take_along_axis(evidence, classes[:, None, None, None], axis=-1)[..., 0]
