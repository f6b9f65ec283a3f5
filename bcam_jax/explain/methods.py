"""The saliency methods by name: a registry from name to how the method gets its maps.

Each method is a pure function `maps(explainer, variables, pixels, targets, layer)`
returning non-negative maps `(N, h, w)` at the layer's resolution for [0, 1] pixels
`(N, S, S, C)` and targets (class indices `(N,)` or a per-sample callable on the logits).
The post-hoc methods explain the layer through `explainer.features` (its features and the
rest of the network as a function of them) and a map function of `bcam_jax.cam` (only its
weighting rule differs from one method to the next); the built-in ones read what the
model computes in its forward pass (Soft-CAM's evidence, CA-Stream's attention). A new
method is one such function plus one `REGISTRY` entry.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from bcam_jax import cam, models
from bcam_jax.explain import fullgrad, guided, layers, legrad
from bcam_jax.models import heads

# (explainer, variables, pixels, targets, layer) -> maps (N, h, w); the explainer is an
# `explain.Explainer` (model adapter, input normalisation, options), targets class indices
# `(N,)` or a per-sample callable on the logits.
MapsFn = Callable[[Any, Any, jax.Array, Any, Any], jax.Array]
# (adapter, variables) -> None; ValueError when the model cannot give the method.
CheckFn = Callable[[Any, Any], None]


@dataclasses.dataclass(frozen=True)
class Method:
  """One registered method.

  Attributes:
    maps: how it gets its maps (`MapsFn`).
    check: what it needs of the model (its `explain.layers` adapter), run before any work;
      None for any model.
    any_layer: whether it explains any layer or the model's default layer only.
    default: measured by `default_methods` wherever the model gives it.
  """

  maps: MapsFn
  check: CheckFn | None = None
  any_layer: bool = True
  default: bool = True


def _with_head(map_fn):
  """A method of `bcam_jax.cam` taking (head_fn, features, targets)."""

  def maps(explainer, variables, pixels, targets, layer):
    features, head_fn = explainer.features(variables, pixels, layer)
    return map_fn(head_fn, features, targets)

  maps.__doc__ = map_fn.__doc__
  return maps


def class_indices(targets, method: str):
  """`targets` as they are; ValueError for a per-sample callable, which `method` (a
  method of class indices) cannot explain."""
  if callable(targets):
    raise ValueError(f'{method} explains class indices, not a callable target')
  return targets


def _cam(explainer, variables, pixels, targets, layer):
  """CAM: the head's dense kernel as channel weights."""
  features, _ = explainer.features(variables, pixels, layer)
  weights = explainer.adapter.class_weights(variables)
  return cam.cam(features, weights, class_indices(targets, 'cam'))


def _features_only(map_fn):
  """A class-agnostic method of `bcam_jax.cam` taking the features alone."""

  def maps(explainer, variables, pixels, targets, layer):
    features, _ = explainer.features(variables, pixels, layer)
    return map_fn(features)

  maps.__doc__ = map_fn.__doc__
  return maps


def _finer_cam(explainer, variables, pixels, targets, layer):
  """Finer-CAM: Grad-CAM of the target against its most similar classes."""
  features, head_fn = explainer.features(variables, pixels, layer)
  return cam.finer_cam(head_fn, features, class_indices(targets, 'finer_cam'))


def _dff_cam(explainer, variables, pixels, targets, layer):
  """Deep Feature Factorization: the explanation of the image's concept that the head
  scores highest for the target class (`cam.dff_cam`)."""
  features, head_fn = explainer.features(variables, pixels, layer)
  targets = class_indices(targets, 'deep_feature_factorization')
  return cam.dff_cam(head_fn, features, targets, explainer.dff_components)


def _ablation_cam(explainer, variables, pixels, targets, layer):
  """Ablation-CAM: channel weight = relative drop of the target score with the channel
  zeroed."""
  features, head_fn = explainer.features(variables, pixels, layer)
  return cam.ablation_cam(head_fn, features, targets, chunk_size=explainer.ablation_chunk)


def _score_cam(explainer, variables, pixels, targets, layer):
  """Score-CAM: channel weights = target probability of the image masked by the channel."""
  features, _ = explainer.features(variables, pixels, layer)
  return cam.score_cam(
    lambda p: explainer.logits(variables, p),
    pixels,
    features,
    targets,
    chunk_size=explainer.score_cam_chunk,
  )


def _guided_backprop(explainer, variables, pixels, targets, layer):
  """Guided backpropagation's input gradients as a map: the largest |gradient| over the
  channels, at the image's resolution."""
  return guided.saliency(explainer.guided_gradients(variables, pixels, targets))


def _guided_grad_cam(explainer, variables, pixels, targets, layer):
  """Guided Grad-CAM: guided backpropagation's map times the layer's Grad-CAM at the
  image's resolution, scaled to [0, 1] (Selvaraju et al. 2017)."""
  features, head_fn = explainer.features(variables, pixels, layer)
  grad = cam.normalize_cam(
    cam.upsample_cam(cam.grad_cam(head_fn, features, targets), pixels.shape[1:3])
  )
  return grad * _guided_backprop(explainer, variables, pixels, targets, layer)


def _full_grad(explainer, variables, pixels, targets, layer):
  """FullGrad: the input-gradient and bias-gradient parts of every Conv and BatchNorm
  layer, at the image's resolution (`explain.fullgrad`)."""
  logits_fn = lambda x: explainer.adapter.logits(variables, x)
  return fullgrad.full_grad(logits_fn, explainer.normalize(pixels), targets)


def _sess(explainer, variables, pixels, targets, layer):
  """SESS with Grad-CAM as its base, pytorch-grad-cam's defaults (`Explainer.sess`)."""
  return explainer.sess(variables, pixels, targets, layer=layer)


def _linen_model(adapter, variables) -> None:
  """FullGrad intercepts linen layers by type."""
  if not isinstance(adapter, layers.LinenModel):
    raise ValueError(
      f'method full_grad needs a Flax linen model (its Conv and BatchNorm layers are read '
      f'while it runs); got {adapter.label()}'
    )


def _legrad(explainer, variables, pixels, targets, layer):
  """LeGrad: each ViT block's positive gradients of its own class scores with respect to
  its attention, averaged over heads, queries and blocks, at the patch grid
  (`explain.legrad`)."""
  return legrad.legrad(explainer.adapter, variables, explainer.normalize(pixels), targets)


def _module(explainer):
  return explainer.adapter.module


def _evidence(explainer, variables, pixels, targets, layer):
  """Soft-CAM's evidence map of the target class, ReLU(E_t)."""
  model = _module(explainer)
  features = model.apply(variables, explainer.normalize(pixels), method='backbone')
  evidence = model.apply(variables, features['cam'], method='evidence')
  targets = class_indices(targets, 'evidence')
  return jax.nn.relu(cam.at_least_float32(heads.select_class(evidence, targets)))


def _raw_attention(explainer, variables, pixels, targets, layer):
  """CA-Stream's class-agnostic attention over the CAM layer (sums to 1 per image)."""
  model = _module(explainer)
  features = model.apply(variables, explainer.normalize(pixels), method='backbone')
  return model.apply(variables, features['cam'], features.get('ca_query'), method='attention')


def _gap_dense_head(adapter, variables) -> None:
  """CAM needs the class weights of a global-average-pool + dense head."""
  adapter.class_weights(variables)


def _our_model(adapter, method: str, needs: str):
  module = getattr(adapter, 'module', None)
  if not isinstance(module, models.CamClassifier):
    raise ValueError(f'method {method} needs one of our models with {needs}; got {adapter.label()}')
  return module


def _softcam_head(adapter, variables) -> None:
  """Evidence maps are the Soft-CAM head's own."""
  model = _our_model(adapter, 'evidence', 'head="softcam"')
  if not model.kind.evidence:
    raise ValueError(
      'method evidence needs a Soft-CAM model (head="softcam"); '
      f'{model.label()} has the default head'
    )


def _ca_stream_pooling(adapter, variables) -> None:
  """Raw attention is CA-Stream pooling's own."""
  model = _our_model(adapter, 'raw_attention', 'pooling="ca_stream"')
  if not model.kind.attention:
    raise ValueError(
      'method raw_attention needs a CA-Stream model (pooling="ca_stream"); '
      f'{model.label()} pools by default'
    )


REGISTRY: dict[str, Method] = {
  # Where it applies, CAM's normalised maps are Grad-CAM's (cam == h * w * grad_cam), so
  # measuring both by default would repeat Grad-CAM.
  'cam': Method(_cam, check=_gap_dense_head, any_layer=False, default=False),
  'grad_cam': Method(_with_head(cam.grad_cam)),
  'grad_cam_pp': Method(_with_head(cam.grad_cam_pp)),
  'score_cam': Method(_score_cam),
  # Not measured by default: eval.py's default suite stays the paper's methods.
  'xgrad_cam': Method(_with_head(cam.xgrad_cam), default=False),
  'hires_cam': Method(_with_head(cam.hires_cam), default=False),
  'layer_cam': Method(_with_head(cam.layer_cam), default=False),
  'grad_cam_elementwise': Method(_with_head(cam.grad_cam_elementwise), default=False),
  'shapley_cam': Method(_with_head(cam.shapley_cam), default=False),
  'finer_cam': Method(_finer_cam, default=False),
  'eigen_cam': Method(_features_only(cam.eigen_cam), default=False),
  'eigen_grad_cam': Method(_with_head(cam.eigen_grad_cam), default=False),
  'seg_eigen_cam': Method(_with_head(cam.seg_eigen_cam), default=False),
  'kpca_cam': Method(_features_only(cam.kpca_cam), default=False),
  'fem': Method(_features_only(cam.fem), default=False),
  # NMF of the layer into concepts, the one the head scores highest for the target shown.
  'deep_feature_factorization': Method(_dff_cam, default=False),
  'ablation_cam': Method(_ablation_cam, default=False),
  # The whole network's input gradients through guided ReLUs (explain.guided).
  'guided_backprop': Method(_guided_backprop, default=False),  # at the input, whatever the layer
  'guided_grad_cam': Method(_guided_grad_cam, default=False),
  'full_grad': Method(_full_grad, check=_linen_model, default=False),  # every bias layer
  # 12 scales of sliding windows (122 at the defaults), Grad-CAM of each window.
  'sess': Method(_sess, default=False),
  # A ViT's every block's attention (explain.legrad), whatever the layer.
  'legrad': Method(_legrad, check=legrad.check_model, any_layer=False, default=False),
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
  adapter = layers.as_explained_model(model)
  for name in check_methods(methods):
    if REGISTRY[name].check is not None:
      REGISTRY[name].check(adapter, variables)


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
    method.check(layers.as_explained_model(model), {})
  except ValueError:
    return False
  return True
