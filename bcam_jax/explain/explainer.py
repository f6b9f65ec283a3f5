"""A trained classifier with its input normalisation, explained by method name under jit.

`Explainer` maps [0, 1] pixel images to logits and to saliency maps at image size in
[0, 1], the form the faithfulness metrics and figures use; the method itself comes from
`bcam_jax.explain.methods.REGISTRY`.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from bcam_jax import cam, data
from bcam_jax.explain.layers import layer_features
from bcam_jax.explain.methods import REGISTRY, check_methods

TARGETS = ('label', 'predicted')


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

  def normalize(self, pixels: jax.Array) -> jax.Array:
    """[0, 1] pixels -> the model's input."""
    return data.normalize(pixels, self.mean, self.std, self.dtype)

  def logits(self, variables, pixels: jax.Array) -> jax.Array:
    """[0, 1] pixels `(N, S, S, 1)` -> float32 logits `(N, C)`."""
    return self.model.apply(variables, self.normalize(pixels))[0]

  def features(self, variables, pixels: jax.Array):
    """(features of the explained layer, head_fn from them to logits), see `layer_features`."""
    return layer_features(self.model, variables, self.normalize(pixels), self.layer)

  def targets(self, logits: jax.Array, labels: jax.Array, target: str) -> jax.Array:
    """The class each map explains: the ground-truth `label` or the `predicted` one."""
    if target not in TARGETS:
      raise ValueError(f'target={target!r}; valid: {TARGETS}')
    return labels if target == 'label' else jnp.argmax(logits, axis=-1)

  def raw_maps(self, method: str, variables, pixels: jax.Array, targets: jax.Array) -> jax.Array:
    """Non-negative maps `(N, h, w)` of `method` at the layer's resolution."""
    check_methods([method])
    if not REGISTRY[method].any_layer and self.layer != 'cam':
      raise ValueError(f'{method} explains the last layer only, not layer={self.layer!r}')
    return REGISTRY[method].maps(self, variables, pixels, targets)

  def maps(self, method: str, variables, pixels: jax.Array, targets: jax.Array) -> jax.Array:
    """Saliency `(N, S, S)` in [0, 1]: `raw_maps` upsampled to the image and min-max scaled."""
    raw = self.raw_maps(method, variables, pixels, targets)
    return cam.normalize_cam(cam.upsample_cam(raw, self.image_size))
