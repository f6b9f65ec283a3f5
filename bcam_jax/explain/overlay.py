"""Saliency maps drawn over their images as arrays (pytorch-grad-cam's `show_cam_on_image`),
for users' own figures, notebooks and TensorBoard; `bcam_jax.report` writes the PNGs."""

import jax
import jax.numpy as jnp
import matplotlib as mpl
import numpy as np


def colorize(maps: jax.Array, colormap: str = 'jet') -> jax.Array:
  """[0, 1] maps `(..., H, W)` -> RGB `(..., H, W, 3)` in [0, 1] through a matplotlib
  colormap's 256-entry table (values outside [0, 1] are clipped); jittable."""
  table = jnp.asarray(mpl.colormaps[colormap](np.linspace(0, 1, 256))[:, :3], jnp.float32)
  index = jnp.round(jnp.clip(maps, 0, 1) * 255).astype(jnp.int32)
  return table[index]


def show_cam_on_image(
  pixels: jax.Array, maps: jax.Array, image_weight: float = 0.5, colormap: str = 'jet'
) -> jax.Array:
  """Images `(N, H, W, C)` in [0, 1] (C = 1 or 3) with their [0, 1] maps `(N, H, W)` blended
  over them: `image_weight * image + (1 - image_weight) * colorize(map)`, RGB `(N, H, W, 3)`
  in [0, 1] (times 255 and cast for uint8). Unlike pytorch-grad-cam's it is not rescaled
  by its maximum, so a colour means the same in every image."""
  if pixels.shape[:-1] != maps.shape or pixels.shape[-1] not in (1, 3):
    raise ValueError(
      f'images {pixels.shape} and maps {maps.shape}: expected images (N, H, W, 1 or 3) and '
      'maps (N, H, W) of the same size (upsample maps with cam.upsample_cam)'
    )
  if not 0 <= image_weight <= 1:
    raise ValueError(f'image_weight={image_weight}; expected a weight in [0, 1]')
  rgb = jnp.broadcast_to(pixels, pixels.shape[:-1] + (3,)).astype(jnp.float32)
  return image_weight * rgb + (1 - image_weight) * colorize(maps, colormap)
