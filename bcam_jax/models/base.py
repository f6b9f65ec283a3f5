"""Shared structure of the classifiers: a backbone ending at the Grad-CAM layer, a per-sample head.

Every model is a Flax linen module with three entry points, each usable as a
pure function through ``model.apply(variables, ..., method=...)``:

* ``__call__(x, train=False)`` -> ``(logits, features)``;
* ``backbone(x, train=False)``: images ``(N, H, W, 1)`` -> ``features``, a dict
  of named NHWC stage outputs that includes ``"cam"``, the Grad-CAM target
  layer (the last conv feature map).  All BatchNorm, dropout and stochastic
  depth live here;
* ``head(cam, query=None)``: ``features["cam"]`` -> logits ``(N, num_classes)`` in at least
  float32; ``query`` is the per-sample second input some heads take from the features
  (``head_query``: CA-Stream's query, a ViT's class token).

Every stage output of the features dict except a separate ``"cam"`` goes
through ``self.perturb(name, ...)`` (a no-op unless a ``perturbations``
collection is passed), so that ``bcam_jax.explain.layer_features`` can take
gradients of the class scores with respect to any named layer.

The head is strictly per-sample (no batch statistics, no randomness), so one
``jax.vjp`` of it gives the exact per-sample gradients of the class scores
with respect to the CAM layer, which is what Grad-CAM inside training needs.
The head is also cheap, so it computes in at least float32 whatever the
``dtype`` option (float32 for a bfloat16 backbone, float64 for a float64 one):
given a float32 CAM map its gradients are float32 too.
"""

import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bcam_jax.models import conv
from bcam_jax.models.heads import (
  POOL,
  STREAM_INIT,
  STREAM_OUT,
  CAStream,
  HeadKind,
  SoftCamHead,
  cross_attention,
)


class CamClassifier(nn.Module):
  """Base class of the models: the three entry points and the image-size check.

  Subclasses define ``make_backbone`` (images, train -> features dict),
  ``make_head`` (the default head: cam, query=None -> logits in at least float32),
  ``stream_stages``, ``cam_side`` and ``label``. ``head_type="softcam"`` replaces
  the default head by Soft-CAM's evidence layer, ``pooling="ca_stream"`` its
  global average pooling by CA-Stream (``bcam_jax.models.heads``).

  Attributes:
    num_classes: number of output classes.
    dtype: compute dtype of the backbone (e.g. ``jnp.bfloat16``); parameters
      stay float32, normalisations and the head compute in float32. With
      ``jnp.float64`` (64-bit JAX only, a reference precision for tests) everything
      computes in float64 and ``steps.make_init_fn`` makes float64 parameters.
    conv_lowering: how the backbone's convolutions lower ("auto", "xla",
      "shifted_matmul", "chunked_grad" or "auto_xla_grad", see
      ``bcam_jax.models.conv``); parameters are the same
      whatever the lowering.
  """

  num_classes: int
  dtype: Any = jnp.float32
  head_type: str = 'default'
  pooling: str = 'default'
  conv_lowering: str = 'auto'

  # Names of the features-dict stages that CA-Stream crosses before the CAM layer.
  stream_stages = ()
  # Initialiser of CA-Stream's projection kernels W_0..W_{L-1} (the official code's, per
  # backbone; the head's `Pool` draws W_L alike).
  stream_init = staticmethod(STREAM_INIT)

  def __post_init__(self):
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ValueError(f'num_classes must be a positive int, got {self.num_classes!r}')
    HeadKind(self.head_type, self.pooling)  # valid names and combination
    conv.check_lowering(self.conv_lowering)
    super().__post_init__()

  @property
  def kind(self) -> HeadKind:
    """What the model explains with: Soft-CAM evidence, CA-Stream attention, or neither."""
    return HeadKind(self.head_type, self.pooling)

  def setup(self):
    self.backbone_net = self.make_backbone()
    self.head_net = SoftCamHead(self.num_classes) if self.kind.evidence else self.make_head()
    if self.kind.attention:
      self.stream = CAStream(self.stream_stages, self.stream_init)

  @nn.nowrap
  def make_backbone(self) -> nn.Module:
    """The backbone module: (images, train) -> features dict."""
    raise NotImplementedError(f'{type(self).__name__} must define make_backbone')

  @nn.nowrap
  def make_head(self) -> nn.Module:
    """The default head module: (cam, query=None) -> logits in at least float32."""
    raise NotImplementedError(f'{type(self).__name__} must define make_head')

  @nn.nowrap
  def cam_side(self, image_side: int) -> int:
    """Side of the CAM map for an image side, by the layers' size arithmetic."""
    raise NotImplementedError(f'{type(self).__name__} must define cam_side')

  @nn.nowrap
  def label(self) -> str:
    """Model name with the options that change its sizes, for error messages."""
    raise NotImplementedError(f'{type(self).__name__} must define label')

  @nn.nowrap
  def larger_cam_option(self) -> str | None:
    """The model option that gives a larger CAM map at the same image size, as
    `key=value` (a smaller stem stride), for size errors; None where there is none."""
    return None

  @nn.nowrap
  def min_image_side(self) -> int:
    """Smallest image side that gives at least a 1x1 CAM map."""
    return next(s for s in itertools.count(1) if self.cam_side(s) >= 1)

  @nn.nowrap
  def check_image_size(self, height: int, width: int) -> None:
    """Raise ValueError if a ``height x width`` image gives an empty CAM map."""
    if min(self.cam_side(height), self.cam_side(width)) < 1:
      side = self.min_image_side()
      raise ValueError(
        f'{self.label()}: image size {height}x{width} is too small; it needs at '
        f'least {side}x{side} to give a 1x1 CAM map'
      )

  @nn.nowrap
  def class_weights(self, params) -> Any:
    """The kernel ``(K, num_classes)`` of a global-average-pool + dense head (or of the
    Soft-CAM evidence layer, the same map), which CAM (``bcam_jax.cam.cam``) needs;
    ValueError for any other head."""
    if self.kind.evidence:
      return params['head_net']['evidence']['kernel']
    raise ValueError(
      f'{self.label()} has no global-average-pool + dense head, so CAM does '
      'not apply to it; use grad_cam, grad_cam_pp or score_cam'
    )

  def backbone(self, x, train: bool = False, frozen: bool = False):
    """Images (N, H, W, 1) -> dict of NHWC stage outputs, with "cam" the Grad-CAM layer
    (and, with CA-Stream, "ca_query" `(N, d)`, the query of the last CA block).

    ``frozen``: no gradient flows into the backbone network (CA-Stream's frozen
    protocol), so differentiation skips its backward pass.
    """
    self.check_image_size(x.shape[1], x.shape[2])
    features = self.backbone_net(x, train=train)
    if frozen:
      features = jax.tree.map(jax.lax.stop_gradient, features)
    if self.kind.attention:
      features = features | {'ca_query': self.stream(features)}
    return features

  @nn.nowrap
  def head_query(self, features: dict) -> Any:
    """The head's per-sample second input, taken from the features dict: CA-Stream's
    ``features["ca_query"]``, or None when the head needs only the CAM map (a ViT's default
    head takes its class token)."""
    return features.get('ca_query')

  def head(self, cam, query=None):
    """CAM feature map (N, h, w, k) -> logits (N, num_classes), per sample.
    `query` is ``head_query(features)``, e.g. CA-Stream's features["ca_query"] (see
    ``models.head_fn``)."""
    if self.kind.attention and query is None:
      raise ValueError(
        f'{self.label()} with CA-Stream pooling: head() needs the query '
        'features["ca_query"]; build the head function with '
        'bcam_jax.models.head_fn(model, variables, features)'
      )
    return self.head_net(cam) if query is None else self.head_net(cam, query)

  def evidence(self, cam):
    """Soft-CAM class-evidence maps (N, h, w, num_classes) of the CAM features."""
    if not self.kind.evidence:
      raise ValueError(
        f'{self.label()} has no Soft-CAM head: evidence maps need config.model.head="softcam"'
      )
    return self.head_net.evidence(cam)

  def attention(self, cam, query):
    """CA-Stream's class-agnostic raw attention (N, h, w) over the CAM layer."""
    if not self.kind.attention:
      raise ValueError(
        f'{self.label()} has no CA-Stream: raw attention needs config.model.pooling="ca_stream"'
      )
    return cross_attention(cam, query)[1]

  def __call__(self, x, train: bool = False):
    """Images -> (logits, features); logits are in at least float32."""
    features = self.backbone(x, train=train)
    return self.head(features['cam'], self.head_query(features)), features


def is_stream_param(path: tuple[str, ...]) -> bool:
  """Whether the parameter at key `path` (from the params root) belongs to CA-Stream: q_0
  and W_0..W_{L-1} under 'stream', W_L in the head's pooling (which the default models
  lack). CA-Stream's frozen protocol trains exactly these."""
  return path[:1] == ('stream',) or path[:3] == ('head_net', POOL, STREAM_OUT)
