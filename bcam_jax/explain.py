"""Saliency maps of a trained classifier, by method name and for any named layer, under jit.

`layer_features` gives the features of a layer of the backbone's features dict and the
matching per-sample `head_fn` (the rest of the network as a function of that layer), so
every gradient method of `bcam_jax.cam` explains any layer. `Explainer` binds a model to
its input normalisation: it maps [0, 1] pixel images to logits and to saliency maps at
image size in [0, 1], the form the faithfulness metrics and figures use.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from bcam_jax import cam, data, models
from bcam_jax.models import heads

METHODS = ('cam', 'grad_cam', 'grad_cam_pp', 'score_cam', 'evidence', 'raw_attention')
# Explanations the model computes in its forward pass, at the CAM layer only.
BUILT_IN = {'evidence': 'head="softcam"', 'raw_attention': 'pooling="ca_stream"'}
TARGETS = ('label', 'predicted')


def check_methods(methods) -> tuple[str, ...]:
  """The method names as a tuple; ValueError naming any unknown one."""
  methods = tuple(methods)
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise ValueError(f'unknown CAM method(s) {unknown or methods}; valid: {", ".join(METHODS)}')
  return methods


def default_methods(model) -> tuple[str, ...]:
  """The post-hoc methods plus what the model explains itself (Soft-CAM evidence,
  CA-Stream raw attention)."""
  own = ('evidence',) if model.head_type == 'softcam' else ()
  own += ('raw_attention',) if model.pooling == 'ca_stream' else ()
  return ('grad_cam', 'grad_cam_pp', 'score_cam') + own


def check_applicable(model, variables, methods) -> None:
  """ValueError, before any work, for a method the model cannot give."""
  for method in check_methods(methods):
    if method == 'cam':
      model.class_weights(variables['params'])
    if method == 'evidence' and model.head_type != 'softcam':
      raise ValueError(
        f'method evidence needs a Soft-CAM model ({BUILT_IN[method]}); '
        f'{model.label()} has the default head'
      )
    if method == 'raw_attention' and model.pooling != 'ca_stream':
      raise ValueError(
        f'method raw_attention needs a CA-Stream model ({BUILT_IN[method]}); '
        f'{model.label()} pools by default'
      )


def layer_features(model, variables, x: jax.Array, layer: str = 'cam'):
  """(features of `layer` `(N, h, w, K)`, head_fn mapping them to logits `(N, C)`).

  For 'cam' head_fn is the model's head. For another layer it runs the whole model with
  `a - A` added at that layer through Flax perturbations, so its value is the model's
  logits at a = A and its VJP there is d logits / d layer, per sample (evaluation mode has
  no batch coupling).
  """
  if layer == 'cam':
    features = model.apply(variables, x, method='backbone')
    return features['cam'], models.head_fn(model, variables, features)
  features, state = model.apply(variables, x, method='backbone', mutable=['perturbations'])
  zeros = traverse_util.flatten_dict(state.get('perturbations', {}))
  keys = [k for k in zeros if k[-1] == layer]
  if layer not in features or len(keys) != 1:
    raise ValueError(
      f'layer {layer!r} is not a named layer of {model.label()}; valid: '
      f'{", ".join(sorted(features))}'
    )
  anchor = jax.lax.stop_gradient(features[layer])

  def head_fn(a):
    perturbations = traverse_util.unflatten_dict(zeros | {keys[0]: a - anchor})
    return model.apply(variables | {'perturbations': perturbations}, x)[0]

  return features[layer], head_fn


@dataclasses.dataclass(frozen=True)
class Explainer:
  """A model with its normalisation, explained at `layer` (default the CAM layer).

  score_cam_chunk: channels per Score-CAM call (batch * chunk images per forward pass).
  """

  model: Any
  mean: float
  std: float
  image_size: int
  dtype: Any = jnp.float32
  layer: str = 'cam'
  score_cam_chunk: int = 32

  def logits(self, variables, pixels: jax.Array) -> jax.Array:
    """[0, 1] pixels `(N, S, S, 1)` -> float32 logits `(N, C)`."""
    x = data.normalize(pixels, self.mean, self.std, self.dtype)
    return self.model.apply(variables, x)[0]

  def targets(self, logits: jax.Array, labels: jax.Array, target: str) -> jax.Array:
    """The class each map explains: the ground-truth `label` or the `predicted` one."""
    if target not in TARGETS:
      raise ValueError(f'target={target!r}; valid: {TARGETS}')
    return labels if target == 'label' else jnp.argmax(logits, axis=-1)

  def raw_maps(self, method: str, variables, pixels: jax.Array, targets: jax.Array) -> jax.Array:
    """Non-negative maps `(N, h, w)` of `method` at the layer's resolution."""
    check_methods([method])
    x = data.normalize(pixels, self.mean, self.std, self.dtype)
    if method in ('cam',) + tuple(BUILT_IN) and self.layer != 'cam':
      raise ValueError(f'{method} explains the last layer only, not layer={self.layer!r}')
    if method in BUILT_IN:
      return self._built_in(method, variables, x, targets)
    features, head_fn = layer_features(self.model, variables, x, self.layer)
    if method == 'cam':
      return cam.cam(features, self.model.class_weights(variables['params']), targets)
    if method == 'grad_cam':
      return cam.grad_cam(head_fn, features, targets)
    if method == 'grad_cam_pp':
      return cam.grad_cam_pp(head_fn, features, targets)
    return cam.score_cam(
      lambda p: self.logits(variables, p),
      pixels,
      features,
      targets,
      chunk_size=self.score_cam_chunk,
    )

  def _built_in(self, method: str, variables, x: jax.Array, targets: jax.Array):
    """Soft-CAM's ReLU(E_t), or CA-Stream's class-agnostic raw attention."""
    features = self.model.apply(variables, x, method='backbone')
    if method == 'evidence':
      evidence = self.model.apply(variables, features['cam'], method='evidence')
      return jax.nn.relu(cam.at_least_float32(heads.select_class(evidence, targets)))
    return self.model.apply(
      variables, features['cam'], features.get('ca_query'), method='attention'
    )

  def maps(self, method: str, variables, pixels: jax.Array, targets: jax.Array) -> jax.Array:
    """Saliency `(N, S, S)` in [0, 1]: `raw_maps` upsampled to the image and min-max scaled."""
    raw = self.raw_maps(method, variables, pixels, targets)
    return cam.normalize_cam(cam.upsample_cam(raw, self.image_size))
