"""Max pooling as a maximum over the window's strided slices.

``flax.linen.max_pool`` lowers to ``reduce_window``, whose gradient is XLA's
``select_and_scatter``, an order of magnitude slower on CPU than the gradient of an
elementwise maximum over the window's strided slices (measured in bench/README.md). The
values are the same; where several inputs of a
window tie for the maximum, the gradient is shared between them instead of going to the
first one (after a ReLU, ties are mostly zeros, whose gradient is zero either way).
"""

import jax
import jax.numpy as jnp
from jax import lax


def max_pool(
  x: jax.Array,
  window: tuple[int, int],
  strides: tuple[int, int],
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
) -> jax.Array:
  """Max pool of NHWC ``x``: windows ``window``, ``strides``, explicit -inf ``padding``
  ((lo, hi) per spatial axis); output sides floor((side + lo + hi - window) / stride) + 1,
  as ``nn.max_pool`` with the same arguments."""
  n, h, w, c = x.shape
  (top, bottom), (left, right) = padding
  if top or bottom or left or right:
    x = lax.pad(
      x, jnp.array(-jnp.inf, x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0))
    )
  h, w = h + top + bottom, w + left + right
  ho = (h - window[0]) // strides[0] + 1
  wo = (w - window[1]) // strides[1] + 1
  if ho < 1 or wo < 1:
    raise ValueError(f'max_pool: window {window} does not fit a {h}x{w} (padded) map')
  out = None
  for i in range(window[0]):
    for j in range(window[1]):
      piece = lax.slice(
        x,
        (0, i, j, 0),
        (n, i + (ho - 1) * strides[0] + 1, j + (wo - 1) * strides[1] + 1, c),
        (1, strides[0], strides[1], 1),
      )
      out = piece if out is None else jnp.maximum(out, piece)
  return out
