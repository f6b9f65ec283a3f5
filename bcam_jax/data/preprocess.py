"""On-device preprocessing: uint8 images stay at their native size on the host; scaling to
[0, 1], resizing to ``image_size`` and normalisation happen inside the jitted step."""

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


def normalize(pixels: jax.Array, mean: float, std: float, dtype=jnp.float32) -> jax.Array:
  """[0, 1] pixels -> the model's input (x - mean) / std in `dtype`, computed in at least
  float32 (in float64 for a float64 model, so its input carries no float32 rounding)."""
  x = pixels.astype(jnp.promote_types(dtype, jnp.float32))
  return ((x - mean) / std).astype(dtype)


def preprocess(images, mean: float, std: float, image_size: int, dtype=jnp.float32) -> jax.Array:
  """uint8 (N, H, W, C) -> normalised `dtype` (N, image_size, image_size, C); jittable:
  `to_pixels` then `normalize`."""
  return normalize(to_pixels(images, image_size), mean, std, dtype)
