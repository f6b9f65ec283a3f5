"""On-device preprocessing: uint8 images stay at their native size on the host; scaling to
[0, 1], resizing to ``image_size`` and normalisation happen inside the jitted step."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def to_pixels(images, image_size: int) -> jax.Array:
  """uint8 (N, H, W, C) -> float32 pixels in [0, 1] at (N, image_size, image_size, C).

  Resizes bilinearly when needed, on device, so no resized copy is ever stored; jittable
  with `image_size` static. This is the space where explanations mask images (0 = black).
  """
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  n, height, width, channels = x.shape
  if (height, width) != (image_size, image_size):
    x = jax.image.resize(x, (n, image_size, image_size, channels), method='bilinear')
  return x


def normalize(
  pixels: jax.Array,
  mean: float | Sequence[float],
  std: float | Sequence[float],
  dtype=jnp.float32,
) -> jax.Array:
  """[0, 1] pixels (..., C) -> the model's input (x - mean) / std in `dtype`, computed in at
  least float32 (in float64 for a float64 model, so its input carries no float32 rounding).

  `mean` and `std` are each a float (every channel) or a sequence of one value per channel
  (or a single value), broadcast over the last axis.
  """
  x = pixels.astype(jnp.promote_types(dtype, jnp.float32))
  mean = _per_channel('mean', mean, x)
  std = _per_channel('std', std, x)
  return ((x - mean) / std).astype(dtype)


def _per_channel(name: str, value, x: jax.Array):
  """`value` as is when a Python number, else an array of x's dtype that broadcasts over the
  channels of `x`; a ValueError when its length is neither 1 nor the channel count."""
  if isinstance(value, (int, float)):
    return value
  array = jnp.asarray(value, x.dtype)
  channels = x.shape[-1]
  if array.ndim > 1 or array.size not in (1, channels):
    raise ValueError(
      f'{name}={value!r} has {array.size} values for images of {channels} channels; '
      'expected one value or one per channel.'
    )
  return array.reshape(-1)


def preprocess(
  images,
  mean: float | Sequence[float],
  std: float | Sequence[float],
  image_size: int,
  dtype=jnp.float32,
) -> jax.Array:
  """uint8 (N, H, W, C) -> normalised `dtype` (N, image_size, image_size, C); jittable:
  `to_pixels` then `normalize`."""
  return normalize(to_pixels(images, image_size), mean, std, dtype)
