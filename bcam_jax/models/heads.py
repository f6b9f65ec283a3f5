"""Self-explainable alternatives to global average pooling + dense, for every backbone.

Soft-CAM (Djoumessi & Berens 2025): a 1x1 convolution with one output channel per class
turns the CAM-layer features A `(N, h, w, K)` into class-evidence maps
E = A W + b `(N, h, w, C)`; the logits are their spatial mean. Because the mean is linear,
a Soft-CAM head with the weights of a trained dense layer gives exactly the logits of
GAP + dense, and E[..., t] is the explanation of class t, computed in the forward pass.

CA-Stream (Torres et al. 2024, section 3.3): a learnable CLS query q_0 crosses every stage
of the backbone. At a stage with features F `(N, h, w, d)`, the attention over positions
is a = softmax(F q / sqrt(d)) and the pooled feature F^T a (no query/key/value
projections); a linear map W_l takes it to the next stage's width: q_{l+1} = W_l F_l^T a_l.
At the last (CAM) layer the pooled feature replaces GAP before the classifier, and a is
the class-agnostic raw-attention explanation. A zero query gives uniform attention: GAP.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bcam_jax.cam import at_least_float32

HEAD_TYPES = ('default', 'softcam')
POOLINGS = ('default', 'ca_stream')


def cross_attention(features: jax.Array, query: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(pooled `(N, d)`, attention `(N, h, w)`) of features `(N, h, w, d)` for a query
  `(N, d)`: a = softmax over the h*w positions of F q / sqrt(d), pooled = F^T a."""
  f = at_least_float32(features)
  n, h, w, d = f.shape
  scores = jnp.einsum('nhwd,nd->nhw', f, at_least_float32(query)) / jnp.sqrt(d)
  attention = jax.nn.softmax(scores.reshape(n, h * w), axis=-1).reshape(n, h, w)
  return jnp.einsum('nhwd,nhw->nd', f, attention), attention


def pool(cam, query=None) -> jax.Array:
  """Global average pooling of `(N, h, w, k)` in at least float32, or CA pooling given a
  query."""
  if query is None:
    return jnp.mean(at_least_float32(cam), axis=(1, 2))
  return cross_attention(cam, query)[0]


class CAStream(nn.Module):
  """The stream up to the last stage: q_0 through the CA blocks of `stages` -> q_L, the
  query of the last block (which runs in the head, at the CAM layer).

  Attributes:
    stages: names in the features dict of the stages before the CAM layer, in order.
  """

  stages: tuple[str, ...]

  @nn.compact
  def __call__(self, features):
    first = features[self.stages[0]]
    q0 = self.param('query', nn.initializers.normal(0.02), (first.shape[-1],), jnp.float32)
    q = jnp.broadcast_to(q0, (first.shape[0], first.shape[-1]))
    names = self.stages + ('cam',)
    for name, following in zip(names[:-1], names[1:]):
      pooled, _ = cross_attention(features[name], q)
      q = nn.Dense(features[following].shape[-1], name=f'{name}_to_{following}')(pooled)
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
