"""A classifier with its input normalisation, explained by method name under jit.

`Explainer` maps [0, 1] pixel images to logits and to saliency maps at image size in
[0, 1], the form the faithfulness metrics and figures use; the method itself comes from
`bcam_jax.explain.methods.REGISTRY`, the layer's features from `bcam_jax.explain.layers`.
It explains our models, any Flax linen or NNX module and a pair of pure functions:

    explainer = explain.Explainer(net, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                  layer='Conv_2')
    maps = jax.jit(explainer.maps, static_argnums=0)('grad_cam', variables, pixels, labels)
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bcam_jax import cam, data
from bcam_jax.explain import guided, sess
from bcam_jax.explain import layers as layers_lib
from bcam_jax.explain.methods import REGISTRY, check_methods, class_indices

TARGETS = ('label', 'predicted')
# How the maps of several layers combine (`Explainer.fusion`).
FUSIONS = ('mean', 'product')
# What a map explains: a name of TARGETS, class indices, or a per-sample callable on logits.
TargetSpec = str | int | jax.Array | Callable[[jax.Array], jax.Array]

# Test-time augmentation of `augment=True`, pytorch-grad-cam's `aug_smooth`: each image as
# is and mirrored, each at three brightnesses.
_TTA_FLIPS = (False, True)
_TTA_FACTORS = (0.9, 1.0, 1.1)


@dataclasses.dataclass(frozen=True)
class Explainer:
  """A model with its normalisation, explained at `layer`.

  Attributes:
    model: one of `bcam_jax.models`, a Flax linen module, an Equinox module (its arrays are
      then the default `variables`), a Flax NNX module (its state is
      then the default `variables`), or an adapter of `bcam_jax.explain.layers`
      (`LinenModel` with apply options, `NNXModel`, `FunctionsModel`).
    mean: the input normalisation's mean, `(pixels - mean) / std`, a scalar or one value
      per channel.
    std: its standard deviation, a scalar or one value per channel.
    image_size: side of the maps; None for the images' own size.
    dtype: the model's input dtype.
    layer: the layer explained, or a sequence of layers whose maps are fused (each upsampled
      and scaled to [0, 1], then combined by `fusion` and scaled again).
      None: the model's default ('cam' for ours; linen and NNX modules need a name).
    score_cam_chunk: channels per masked forward pass of Score-CAM; each call sees
      batch * chunk images.
    ablation_chunk: channels per head call of Ablation-CAM; each call sees batch * chunk
      feature sets.
    prefix_tokens: for token features `(N, L, D)`, the class and register tokens before the
      square grid of patches (`layers.token_grid`).
    noise_samples: SmoothGrad-style smoothing, the mean map over `noise_samples` copies of
      each image with Gaussian noise of `noise_std` added; 0 for none. Needs a `key` in
      `maps`.
    noise_std: that noise's standard deviation, in [0, 1] pixel units.
    augment: test-time augmentation, the mean map over the image as is and mirrored, at
      brightness x0.9, x1 and x1.1, each map mapped back to the original frame.
    fusion: how a sequence of layers' maps combine: 'mean' (pytorch-grad-cam's multi-layer
      rule) or 'product' (RefineCAM, `cam.refine_cam`: a position stays only where every layer
      marks it; with an early and a late layer, the early layer's detail denoised).
    dff_components: the concepts per image of method 'deep_feature_factorization'
      (`cam.dff_cam`; `factorization` takes its own).
  """

  model: Any
  mean: float | Sequence[float] = 0.0
  std: float | Sequence[float] = 1.0
  image_size: int | None = None
  dtype: Any = jnp.float32
  layer: str | Sequence[str] | None = None
  score_cam_chunk: int = 32
  ablation_chunk: int = 32
  prefix_tokens: int = 1
  noise_samples: int = 0
  noise_std: float = 0.15
  augment: bool = False
  fusion: str = 'mean'
  dff_components: int = cam.DFF_COMPONENTS
  adapter: Any = dataclasses.field(init=False, repr=False, compare=False)
  default_variables: Any = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    adapter, state = self.model, None
    eqx = layers_lib.equinox_or_none()
    if isinstance(self.model, nnx.Module):
      adapter, state = layers_lib.NNXModel.split(self.model)
    elif eqx is not None and isinstance(self.model, eqx.Module):
      adapter, state = layers_lib.EquinoxModel.split(self.model)
    object.__setattr__(self, 'adapter', layers_lib.as_explained_model(adapter))
    object.__setattr__(self, 'default_variables', state)
    if self.fusion not in FUSIONS:
      raise ValueError(f'fusion={self.fusion!r}; expected one of {", ".join(FUSIONS)}')
    for name in ('score_cam_chunk', 'ablation_chunk'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name}={getattr(self, name)}; expected a positive number of channels')
    if self.noise_samples < 0 or self.noise_std < 0:
      raise ValueError(
        f'noise_samples={self.noise_samples}, noise_std={self.noise_std}; expected >= 0'
      )

  @property
  def layers(self) -> tuple[str | None, ...]:
    """The explained layers (None: the model's default)."""
    if self.layer is None or isinstance(self.layer, str):
      return (self.layer or self.adapter.default_layer,)
    if not self.layer:
      raise ValueError('layer=(): name at least one layer')
    return tuple(self.layer)

  def _variables(self, variables):
    """The variables given (None: the default), or the states of a whole `split` result
    `(adapter, state, ...)` passed as the variables."""
    if variables is None:
      return self.default_variables
    return layers_lib.states_of(variables)

  def normalize(self, pixels: jax.Array) -> jax.Array:
    """[0, 1] pixels `(N, H, W, C)` -> the model's input; mean and std per channel or scalar."""
    channels = pixels.shape[-1]
    for name in ('mean', 'std'):
      size = jnp.size(jnp.asarray(getattr(self, name)))
      if jnp.ndim(jnp.asarray(getattr(self, name))) > 1 or size not in (1, channels):
        raise ValueError(
          f'{name}={getattr(self, name)!r} has {size} values for images of {channels} '
          'channels; give one value or one per channel'
        )
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return data.normalize(pixels, mean, std, self.dtype)

  def logits(self, variables, pixels: jax.Array) -> jax.Array:
    """[0, 1] pixels `(N, H, W, C)` -> logits `(N, C)` in at least float32."""
    logits = self.adapter.logits(self._variables(variables), self.normalize(pixels))
    return cam.at_least_float32(logits)

  def guided_gradients(self, variables, pixels: jax.Array, targets) -> jax.Array:
    """Guided backpropagation `(N, H, W, C)` (`explain.guided`): the target score's gradient
    with respect to the model's input (the normalised pixels), every ReLU's backward pass
    guided; pytorch-grad-cam's `GuidedBackpropReLUModel` for a whole batch."""
    variables = self._variables(variables)
    return guided.guided_gradients(
      lambda x: self.adapter.logits(variables, x), self.normalize(pixels), targets
    )

  def sess(
    self,
    variables,
    pixels: jax.Array,
    targets: jax.Array,
    base: str = 'grad_cam',
    layer: str | None = None,
    **options,
  ) -> jax.Array:
    """SESS maps `(N, H, W)` in [0, 1] at the images' resolution (`explain.sess`): `base`
    (any method of `REGISTRY` but SESS) at `layer` (default the first explained layer) on
    window-sized patches of the images at several scales, fused. `targets` are class
    indices `(N,)`; `options` are `sess.sess`'s (`scales`, `window_size`, `step_size`,
    `pre_filter_ratio`, `theta`, `pool`, `smooth`, `use_softmax_scores`, `chunk`)."""
    check_methods([base])
    if base == 'sess':
      raise ValueError('sess needs another method as its base, not sess')
    targets = class_indices(targets, 'sess')
    variables = self._variables(variables)

    def patch_fn(patches, patch_targets):
      maps = self.raw_maps(base, variables, patches, patch_targets, layer)
      return maps, self.logits(variables, patches)

    return cam.normalize_cam(sess.sess(patch_fn, pixels, targets, **options))

  def factorization(
    self,
    variables,
    pixels: jax.Array,
    n_components: int = cam.DFF_COMPONENTS,
    layer: str | None = None,
    joint: bool = False,
  ) -> cam.ConceptFactorization:
    """Deep Feature Factorization of `layer` (default: the first explained layer): each
    image's concepts `(N, K, n)`, their explanations `(N, n, h, w)` at the layer's
    resolution and their logits `(N, n, C)` by the rest of the network
    (`cam.deep_feature_factorization`; `joint=True`: one factorization of the whole batch,
    as pytorch-grad-cam's `DeepFeatureFactorization`). `jax.nn.softmax(scores)` gives the
    class probabilities pytorch-grad-cam labels the concepts with."""
    features, head_fn = self.features(variables, pixels, layer)
    return cam.deep_feature_factorization(features, n_components, head_fn, joint=joint)

  def layer_shapes(self, variables, pixels: jax.Array) -> dict[str, tuple]:
    """{layer name: output shape} of the layers the model can explain, for choosing `layer`
    (shape inference only)."""
    return self.adapter.layers(self._variables(variables), self.normalize(pixels))

  def features(self, variables, pixels: jax.Array, layer: str | None = None):
    """(features `(N, h, w, K)` of `layer` (default: the first explained layer), head_fn
    from them to logits); token features `(N, L, D)` come back as their patch grid."""
    layer = self.layers[0] if layer is None else layer
    if layer is None:
      raise ValueError(
        f'name the layer of {self.adapter.label()} to explain: Explainer(..., layer=...); '
        'explainer.layer_shapes(variables, pixels) lists them'
      )
    features, head_fn = self.adapter.features(
      self._variables(variables), self.normalize(pixels), layer
    )
    if features.ndim == 3:
      features, head_fn = layers_lib.token_grid(features, head_fn, self.prefix_tokens)
    if features.ndim != 4:
      raise ValueError(
        f'layer {layer!r} of {self.adapter.label()} gives features of shape '
        f'{features.shape}; expected NHWC maps (N, h, w, K) or tokens (N, L, D)'
      )
    return features, head_fn

  def targets(self, logits: jax.Array, labels: jax.Array | None, target: TargetSpec) -> Any:
    """What each map explains, as `bcam_jax.cam` takes it: 'label' (the ground truth),
    'predicted', a class index for every image, class indices `(N,)`, or a per-sample
    callable on the logits `(N, C) -> (N,)` (e.g. a softmax probability, a sum of classes)."""
    if callable(target):
      return target
    if isinstance(target, str):
      if target not in TARGETS:
        raise ValueError(f'target={target!r}; valid: {TARGETS}, class indices or a callable')
      return labels if target == 'label' else jnp.argmax(logits, axis=-1)
    target = jnp.asarray(target)
    if not jnp.issubdtype(target.dtype, jnp.integer) or target.ndim > 1:
      raise ValueError(
        f'target of dtype {target.dtype} and shape {target.shape}; expected class indices'
      )
    return jnp.broadcast_to(target, logits.shape[:1])

  def raw_maps(
    self, method: str, variables, pixels: jax.Array, targets, layer: str | None = None
  ) -> jax.Array:
    """Non-negative maps `(N, h, w)` of `method` at the resolution of `layer` (default the
    first explained layer); `targets` as `bcam_jax.cam` takes them (see `targets`)."""
    check_methods([method])
    layer = self.layers[0] if layer is None else layer
    if not REGISTRY[method].any_layer and layer not in (None, self.adapter.default_layer):
      raise ValueError(f'{method} explains the last layer only, not layer={layer!r}')
    return REGISTRY[method].maps(self, self._variables(variables), pixels, targets, layer)

  def _scaled_maps(self, method: str, variables, pixels: jax.Array, targets) -> jax.Array:
    """Each layer's maps at image size in [0, 1], fused over the layers."""
    size = self.image_size or pixels.shape[1:3]
    scaled = [
      cam.normalize_cam(
        cam.upsample_cam(self.raw_maps(method, variables, pixels, targets, name), size)
      )
      for name in self.layers
    ]
    if len(scaled) == 1:
      return scaled[0]
    if self.fusion == 'product':
      return cam.refine_cam(jnp.stack(scaled))
    return cam.normalize_cam(jnp.mean(jnp.stack(scaled), 0))

  def maps(
    self, method: str, variables, pixels: jax.Array, targets, key: jax.Array | None = None
  ) -> jax.Array:
    """Saliency `(N, S, S)` in [0, 1]: raw maps upsampled to the image and min-max scaled,
    fused over the layers and smoothed as the explainer says (`key` for noise)."""
    if not self.noise_samples and not self.augment:
      return self._scaled_maps(method, variables, pixels, targets)
    if self.noise_samples and key is None:
      raise ValueError(f'noise_samples={self.noise_samples} needs a key: maps(..., key=...)')
    n = pixels.shape[0]
    flips, factors = (_TTA_FLIPS, _TTA_FACTORS) if self.augment else ((False,), (1.0,))
    views = [(f, s) for f in flips for s in factors]
    stack = jnp.concatenate([(jnp.flip(pixels, 2) if f else pixels) * s for f, s in views])
    copies = max(self.noise_samples, 1)
    stack = jnp.tile(stack, (copies, 1, 1, 1))
    if self.noise_samples:
      stack = stack + self.noise_std * jax.random.normal(key, stack.shape, stack.dtype)
    tiled = targets if callable(targets) else jnp.tile(targets, copies * len(views))
    maps = self._scaled_maps(method, variables, stack, tiled)
    maps = maps.reshape((copies, len(views), n) + maps.shape[1:])
    maps = jnp.stack(
      [jnp.flip(maps[:, i], -1) if f else maps[:, i] for i, (f, _) in enumerate(views)], 1
    )
    return cam.normalize_cam(jnp.mean(maps, axis=(0, 1)))
