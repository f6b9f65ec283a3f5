"""The saliency methods by name: a registry from name to how the method gets its maps.

Each method is a pure function `maps(explainer, variables, pixels, targets)` returning
non-negative maps `(N, h, w)` at the explained layer's resolution for [0, 1] pixels
`(N, S, S, C)` and target classes `(N,)`. The post-hoc methods explain the explainer's
layer through `explainer.features` (its features and the rest of the network as a
function of them) and a map function of `bcam_jax.cam`; the built-in ones read what the
model computes in its forward pass (Soft-CAM's evidence, CA-Stream's attention). A new
method is one such function plus one `REGISTRY` entry.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from bcam_jax import cam
from bcam_jax.models import heads

# (explainer, variables, pixels, targets) -> maps (N, h, w); the explainer is an
# `explain.Explainer` (model, input normalisation, layer, options).
MapsFn = Callable[[Any, Any, jax.Array, jax.Array], jax.Array]
# (model, variables) -> None; ValueError when the model cannot give the method.
CheckFn = Callable[[Any, Any], None]


@dataclasses.dataclass(frozen=True)
class Method:
  """One registered method.

  maps: how it gets its maps (`MapsFn`).
  check: what it needs of the model, run before any work; None for any model.
  any_layer: whether it explains any named layer or the CAM layer only.
  default: measured by `default_methods` wherever the model gives it.
  """

  maps: MapsFn
  check: CheckFn | None = None
  any_layer: bool = True
  default: bool = True


def _cam(explainer, variables, pixels, targets):
  """CAM: the head's dense kernel as channel weights."""
  features, _ = explainer.features(variables, pixels)
  return cam.cam(features, explainer.model.class_weights(variables['params']), targets)


def _grad_cam(explainer, variables, pixels, targets):
  """Grad-CAM: channel weights = spatial mean of the target logit's gradient."""
  features, head_fn = explainer.features(variables, pixels)
  return cam.grad_cam(head_fn, features, targets)


def _grad_cam_pp(explainer, variables, pixels, targets):
  """Grad-CAM++: channel weights from the gradient's higher-order terms."""
  features, head_fn = explainer.features(variables, pixels)
  return cam.grad_cam_pp(head_fn, features, targets)


def _score_cam(explainer, variables, pixels, targets):
  """Score-CAM: channel weights = target probability of the image masked by the channel."""
  features, _ = explainer.features(variables, pixels)
  return cam.score_cam(
    lambda p: explainer.logits(variables, p),
    pixels,
    features,
    targets,
    chunk_size=explainer.score_cam_chunk,
  )


def _evidence(explainer, variables, pixels, targets):
  """Soft-CAM's evidence map of the target class, ReLU(E_t)."""
  model = explainer.model
  features = model.apply(variables, explainer.normalize(pixels), method='backbone')
  evidence = model.apply(variables, features['cam'], method='evidence')
  return jax.nn.relu(cam.at_least_float32(heads.select_class(evidence, targets)))


def _raw_attention(explainer, variables, pixels, targets):
  """CA-Stream's class-agnostic attention over the CAM layer (sums to 1 per image)."""
  model = explainer.model
  features = model.apply(variables, explainer.normalize(pixels), method='backbone')
  return model.apply(variables, features['cam'], features.get('ca_query'), method='attention')


def _gap_dense_head(model, variables) -> None:
  """CAM needs the class weights of a global-average-pool + dense head."""
  model.class_weights(variables['params'])


def _softcam_head(model, variables) -> None:
  """Evidence maps are the Soft-CAM head's own."""
  if model.head_type != 'softcam':
    raise ValueError(
      'method evidence needs a Soft-CAM model (head="softcam"); '
      f'{model.label()} has the default head'
    )


def _ca_stream_pooling(model, variables) -> None:
  """Raw attention is CA-Stream pooling's own."""
  if model.pooling != 'ca_stream':
    raise ValueError(
      'method raw_attention needs a CA-Stream model (pooling="ca_stream"); '
      f'{model.label()} pools by default'
    )


REGISTRY: dict[str, Method] = {
  # Where it applies, CAM's normalised maps are Grad-CAM's (cam == h * w * grad_cam), so
  # measuring both by default would repeat Grad-CAM.
  'cam': Method(_cam, check=_gap_dense_head, any_layer=False, default=False),
  'grad_cam': Method(_grad_cam),
  'grad_cam_pp': Method(_grad_cam_pp),
  'score_cam': Method(_score_cam),
  'evidence': Method(_evidence, check=_softcam_head, any_layer=False),
  'raw_attention': Method(_raw_attention, check=_ca_stream_pooling, any_layer=False),
}
METHODS = tuple(REGISTRY)


def check_methods(methods) -> tuple[str, ...]:
  """The method names as a tuple; ValueError naming any unknown one."""
  methods = tuple(methods)
  unknown = [m for m in methods if m not in REGISTRY]
  if unknown or not methods:
    raise ValueError(f'unknown CAM method(s) {unknown or methods}; valid: {", ".join(REGISTRY)}')
  return methods


def check_applicable(model, variables, methods) -> None:
  """ValueError, before any work, for a method the model cannot give."""
  for name in check_methods(methods):
    if REGISTRY[name].check is not None:
      REGISTRY[name].check(model, variables)


def default_methods(model) -> tuple[str, ...]:
  """Every default method the model gives: the post-hoc ones any model gives plus what the
  model explains itself (Soft-CAM evidence, CA-Stream raw attention), whose checks look at
  the model only."""
  return tuple(
    name for name, method in REGISTRY.items() if method.default and _gives(method, model)
  )


def _gives(method: Method, model) -> bool:
  if method.check is None:
    return True
  try:
    method.check(model, {})
  except ValueError:
    return False
  return True
