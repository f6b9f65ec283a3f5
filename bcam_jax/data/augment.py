"""Train-time augmentation on device: random resized crop and horizontal flip.

Both run inside the jitted train step on the uint8 batch, before normalisation, with a key
derived from the step's key, so a batch's augmentation is a pure function of
``(seed, step)`` and a resumed run draws exactly what an uninterrupted one would. Every
image of the global batch draws its own crop and flip, whatever the number of devices.

`random_resized_crop` follows torchvision's ``RandomResizedCrop``: up to 10 draws of an
integer box with area ``scale`` x the image's and width / height in ``ratio`` (drawn
log-uniformly); the first box that fits is cut, else the central crop of the image clipped
to ``ratio``. The box is resized to ``image_size`` bilinearly (antialiased when it shrinks,
as `preprocess.to_pixels`), straight from the stored image: one interpolation, which reads
only pixels inside the box, as cutting it out and resizing it would. With the
augmentation off the step calls `preprocess.preprocess` as before, so runs without it are
unchanged bit for bit.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from bcam_jax.data.preprocess import to_pixels

_ATTEMPTS = 10  # torchvision's RandomResizedCrop draws at most 10 boxes


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
  """``config.data.augment``: which augmentations run and the crop's ranges."""

  random_resized_crop: bool = False
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  horizontal_flip: bool = False

  @property
  def enabled(self) -> bool:
    return self.random_resized_crop or self.horizontal_flip

  @classmethod
  def from_config(cls, data_config) -> 'AugmentOptions':
    """The options of `data_config.augment`."""
    augment = data_config.augment
    return cls(
      random_resized_crop=bool(augment.random_resized_crop),
      scale=tuple(float(v) for v in augment.scale),
      ratio=tuple(float(v) for v in augment.ratio),
      horizontal_flip=bool(augment.horizontal_flip),
    )

  def check(self) -> None:
    """ValueError naming the field when a range is not (low, high) with 0 < low <= high
    (and high <= 1 for the scale, a fraction of the image)."""
    for name, (low, high), top in (('scale', self.scale, 1.0), ('ratio', self.ratio, math.inf)):
      if not (0 < low <= high <= top):
        limit = ' <= 1' if top == 1.0 else ''
        raise ValueError(
          f'config.data.augment.{name}={(low, high)!r}; expected (low, high) with '
          f'0 < low <= high{limit}.'
        )


def crop_boxes(key: jax.Array, n: int, height: int, width: int, scale, ratio) -> jax.Array:
  """(n, 4) int32 boxes (top, left, box height, box width) of RandomResizedCrop.

  Per image: `_ATTEMPTS` draws of area ``U(scale) * height * width`` and aspect
  ``exp(U(log ratio))``, rounded to integer sides; the first that fits in the image is
  placed uniformly at random; if none fits, the central crop of the image clipped to
  `ratio`.
  """
  area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
  shape = (n, _ATTEMPTS)
  area = height * width * jax.random.uniform(area_key, shape, minval=scale[0], maxval=scale[1])
  log_ratio = jax.random.uniform(
    ratio_key, shape, minval=math.log(ratio[0]), maxval=math.log(ratio[1])
  )
  aspect = jnp.exp(log_ratio)
  w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(fits, axis=1)  # the first box that fits (0 when none does)
  any_fits = fits.any(axis=1)
  h = jnp.take_along_axis(h, first[:, None], 1)[:, 0]
  w = jnp.take_along_axis(w, first[:, None], 1)[:, 0]
  # Uniform integer offsets in [0, side - box]: floor(u * (side - box + 1)).
  u_top = jax.random.uniform(top_key, (n,))
  u_left = jax.random.uniform(left_key, (n,))
  top = jnp.minimum((u_top * (height - h + 1)).astype(jnp.int32), height - h)
  left = jnp.minimum((u_left * (width - w + 1)).astype(jnp.int32), width - w)
  # The fallback: the whole image clipped to the ratio range, centred.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fb_w, fb_h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    fb_w, fb_h = int(round(height * ratio[1])), height
  else:
    fb_w, fb_h = width, height
  fallback = jnp.array([(height - fb_h) // 2, (width - fb_w) // 2, fb_h, fb_w], jnp.int32)
  boxes = jnp.stack([top, left, h, w], axis=1)
  return jnp.where(any_fits[:, None], boxes, fallback[None, :])


def _axis_weights(start: jax.Array, length: jax.Array, in_size: int, out_size: int) -> jax.Array:
  """(out_size, in_size) weights resizing the pixels [start, start + length) of one axis to
  out_size: output j samples ``start + (j + 0.5) * length / out_size - 0.5`` with the
  triangle (bilinear) kernel, widened by length / out_size when shrinking (antialiasing,
  as `jax.image.resize`), using only pixels inside the box (renormalised), so the box's edge
  pixels extend outwards as when the box is cut out first."""
  start, length = start.astype(jnp.float32), length.astype(jnp.float32)
  centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * length / out_size - 0.5
  width = jnp.maximum(length / out_size, 1.0)
  pixels = jnp.arange(in_size, dtype=jnp.float32)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(pixels[None, :] - centres[:, None]) / width)
  inside = (pixels >= start) & (pixels < start + length)
  weights = jnp.where(inside[None, :], weights, 0.0)
  return weights / weights.sum(axis=1, keepdims=True)


def resize_boxes(pixels: jax.Array, boxes: jax.Array, image_size: int) -> jax.Array:
  """(N, H, W, C) float pixels -> (N, image_size, image_size, C): image i's box
  (top, left, height, width) cut out and resized bilinearly (antialiased when it shrinks),
  as separable weight matrices (`_axis_weights`) applied in float32 at full precision."""
  _, height, width, _ = pixels.shape
  rows = jax.vmap(lambda b: _axis_weights(b[0], b[2], height, image_size))(boxes)
  cols = jax.vmap(lambda b: _axis_weights(b[1], b[3], width, image_size))(boxes)
  return jnp.einsum('nyh,nhwc,nxw->nyxc', rows, pixels, cols, precision=jax.lax.Precision.HIGHEST)


def augment_pixels(images, key: jax.Array, image_size: int, options: AugmentOptions) -> jax.Array:
  """uint8 (N, H, W, C) -> augmented float32 pixels in [0, 1] at (N, image_size, image_size,
  C), `to_pixels`' space; a pure function of (images, key, options)."""
  crop_key, flip_key = jax.random.split(key)
  if options.random_resized_crop:
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    n, height, width, _ = x.shape
    boxes = crop_boxes(crop_key, n, height, width, options.scale, options.ratio)
    x = resize_boxes(x, boxes, image_size)
  else:
    x = to_pixels(images, image_size)
  if options.horizontal_flip:
    flip = jax.random.bernoulli(flip_key, 0.5, (x.shape[0],))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
  return x
