"""Convolutions lowered per call as XLA's convolution or as one matmul over shifted copies.

XLA:CPU runs a 3x3 convolution on a tiny feature map (1x1 to 3x3) far below matmul speed,
while the same convolution written as im2col by concatenation (the kernel taps' shifted, strided
slices of the padded input, concatenated on the channel axis) followed by one dot runs at
matmul speed, forward and backward. On larger maps XLA's own convolution is faster. So
``conv_general_dilated(lowering)`` returns a drop-in replacement of
``lax.conv_general_dilated`` for ``flax.linen.Conv(conv_general_dilated=...)`` that picks,
from the backend and the static shapes at trace time:

* ``"xla"``: ``lax.conv_general_dilated`` (always on GPU and TPU);
* ``"shifted_matmul"``: ``shifted_matmul_conv``;
* ``"chunked_grad"``: ``chunked_grad_conv``, XLA's convolution and input gradient with the
  kernel gradient as im2col GEMMs over batch chunks (XLA:CPU's weight-gradient convolution
  is 3-4x its forward on 28x28 and 14x14 maps);
* ``"auto"`` (default): ``shifted_matmul`` on CPU for tiny output maps, depthwise and
  non-overlapping (kernel <= stride) convolutions, ``chunked_grad`` for the other one-group
  convolutions on CPU, else ``xla`` (``choose_lowering``; bench/conv_lowering.py measures
  each case);
* ``"auto_xla_grad"``: ``"auto"`` with ``xla`` wherever it would take ``chunked_grad``
  (XLA's own weight-gradient convolution).

Parameters are ``nn.Conv``'s own, so checkpoints do not depend on the lowering.

Taps of the kernel that only ever read padding are skipped (a 3x3 kernel on a 1x1 map with
padding 1 is a plain dense layer), and depthwise convolutions (ConvNeXt's 7x7) become a sum
of the taps' slices times their per-channel weights instead of a dot.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

LOWERINGS = ('auto', 'xla', 'shifted_matmul', 'chunked_grad', 'auto_xla_grad')

# "auto" takes the shifted-matmul form on CPU when both output sides are at most this.
SHIFTED_MATMUL_MAX_SIDE = 3
# ... and leaves XLA's weight gradient to output maps of at most this side with fewer input
# channels than CHUNKED_GRAD_MIN_CHANNELS, whose chunked GEMMs are too small to win (the
# ImageNet stem's 4x4x128 layers: 0.76-0.95x; the small stem's 4x4x512 ones: 1.1-1.2x).
CHUNKED_GRAD_SMALL_SIDE = 4
CHUNKED_GRAD_MIN_CHANNELS = 256

_CHANNELS_LAST = ('NHWC', 'HWIO', 'NHWC')


def check_lowering(lowering: str) -> None:
  """ValueError naming the valid lowerings unless ``lowering`` is one of them."""
  if lowering not in LOWERINGS:
    raise ValueError(f'conv_lowering={lowering!r}; valid: {", ".join(LOWERINGS)}')


def explicit_padding(in_spatial, kernel_spatial, strides, padding) -> tuple:
  """``padding`` ("SAME", "VALID" or ((lo, hi), ...)) as explicit (lo, hi) pairs."""
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(in_spatial, kernel_spatial, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def output_spatial(in_spatial, kernel_spatial, strides, pads) -> tuple[int, ...]:
  """Output side per spatial axis of a convolution with explicit ``pads``."""
  return tuple(
    (size + lo + hi - k) // s + 1
    for size, k, s, (lo, hi) in zip(in_spatial, kernel_spatial, strides, pads)
  )


def _useful_taps(size: int, k: int, stride: int, pad_lo: int, out: int) -> list[int]:
  """Kernel offsets along one axis that read at least one real (non-padding) input pixel."""
  return [i for i in range(k) if any(0 <= i + o * stride - pad_lo < size for o in range(out))]


def _is_depthwise(lhs_shape, rhs_shape, feature_group_count: int) -> bool:
  channels, (_, _, in_per_group, out_channels) = lhs_shape[-1], rhs_shape
  return feature_group_count == channels == out_channels and in_per_group == 1


def shifted_matmul_conv(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides,
  padding,
  feature_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
) -> jax.Array:
  """2-D convolution of NHWC ``lhs`` with an HWIO ``rhs`` as im2col by concatenation + one dot.

  Equals ``lax.conv_general_dilated`` with NHWC/HWIO/NHWC dimension numbers and no dilation.
  Supports ``feature_group_count`` 1 and depthwise (groups = input = output channels).
  """
  n, h, w, c = lhs.shape
  kh, kw, in_per_group, out_channels = rhs.shape
  if feature_group_count != 1 and not _is_depthwise(lhs.shape, rhs.shape, feature_group_count):
    raise ValueError(
      f'shifted_matmul_conv supports feature_group_count 1 or depthwise '
      f'(= {c} channels in and out); got {feature_group_count} with kernel '
      f'{rhs.shape}'
    )
  if feature_group_count == 1 and in_per_group != c:
    raise ValueError(f'kernel {rhs.shape} expects {in_per_group} input channels, input has {c}')
  strides = tuple(window_strides)
  pads = explicit_padding((h, w), (kh, kw), strides, padding)
  dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  if feature_group_count != 1 and strides == (1, 1):
    return depthwise_conv(lhs, rhs, pads).astype(dtype)
  taps, slices = _tap_slices(lhs, (kh, kw), strides, pads)
  if feature_group_count != 1:
    return _depthwise_sum(slices, taps, rhs).astype(dtype)
  columns = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
  weights = jnp.concatenate([rhs[i, j] for i, j in taps], axis=0)
  return lax.dot_general(
    columns,
    weights,
    (((3,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=preferred_element_type,
  ).astype(dtype)


def _depthwise_sum(slices, taps, rhs) -> jax.Array:
  """Per-channel multiply-accumulate of the taps' slices with their weights."""
  out = slices[0] * rhs[taps[0][0], taps[0][1], 0]
  for (i, j), piece in zip(taps[1:], slices[1:]):
    out = out + piece * rhs[i, j, 0]
  return out


def _tap_slices(x, kernel, strides, pads) -> tuple[list, list]:
  """The kernel taps (i, j) that read at least one real pixel, and for each the strided
  slice of the padded x that it multiplies."""
  n, h, w, c = x.shape
  ho, wo = output_spatial((h, w), kernel, strides, pads)
  taps = [
    (i, j)
    for i in _useful_taps(h, kernel[0], strides[0], pads[0][0], ho)
    for j in _useful_taps(w, kernel[1], strides[1], pads[1][0], wo)
  ]
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  slices = [
    lax.slice(
      xp,
      (0, i, j, 0),
      (n, i + (ho - 1) * strides[0] + 1, j + (wo - 1) * strides[1] + 1, c),
      (1, *strides, 1),
    )
    for i, j in taps
  ]
  return taps, slices


def _depthwise_forward(x, w, pads):
  """Stride-1 depthwise convolution of x `(N, H, W, C)` with w `(kh, kw, 1, C)`."""
  return _depthwise_sum(*reversed(_tap_slices(x, w.shape[:2], (1, 1), pads)), w)


# Samples per step of the kernel gradient's loop: a chunk of a 28x28x96 map stays in cache
# across the 49 taps' reductions, where the whole batch at once streams every tap from
# memory.
_KERNEL_GRAD_CHUNK = 4


def _depthwise_kernel_grad(x, cotangent, kernel_shape, pads):
  """d loss / d w of the stride-1 depthwise convolution: per tap, the sum over the batch and
  positions of the shifted input times the cotangent, accumulated over batch chunks; zero
  for taps that only read padding."""
  n = x.shape[0]
  chunk = max(d for d in range(1, _KERNEL_GRAD_CHUNK + 1) if n % d == 0)
  accumulate = jnp.promote_types(cotangent.dtype, jnp.float32)

  def chunk_grad(total, pair):
    xc, cc = pair
    taps, slices = _tap_slices(xc, kernel_shape[:2], (1, 1), pads)
    for (i, j), piece in zip(taps, slices):
      total = total.at[i, j, 0].add(jnp.sum(piece * cc, axis=(0, 1, 2), dtype=accumulate))
    return total, None

  pairs = (
    x.reshape(n // chunk, chunk, *x.shape[1:]),
    cotangent.reshape(n // chunk, chunk, *cotangent.shape[1:]),
  )
  return lax.scan(chunk_grad, jnp.zeros(kernel_shape, accumulate), pairs)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv(x: jax.Array, w: jax.Array, pads) -> jax.Array:
  """Stride-1 depthwise convolution (NHWC x, w `(kh, kw, 1, C)`, explicit ``pads``) as a sum
  of shifted slices, with a backward pass that keeps only x and w: the input gradient is
  the depthwise convolution of the cotangent with the flipped kernel, the kernel gradient a
  cache-blocked loop over the batch (bench/README.md)."""
  return _depthwise_forward(x, w, pads)


def _depthwise_fwd(x, w, pads):
  return _depthwise_forward(x, w, pads), (x, w)


def _depthwise_bwd(pads, residuals, cotangent):
  x, w = residuals
  flipped = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(w.shape[:2], pads))
  dx = _depthwise_forward(cotangent, w[::-1, ::-1], flipped)
  return dx.astype(x.dtype), _depthwise_kernel_grad(x, cotangent, w.shape, pads).astype(w.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


# Bytes of one step's im2col columns in the chunked weight gradient: at 28x28x64 that is 4
# samples (1.8 MB each), at 14x14x128 8, at 7x7x256 and 4x4x512 16 (bench/README.md, "The
# weight gradient of 3x3 convolutions, chunked").
GEMM_GRAD_CHUNK_BYTES = 8 << 20


def gemm_grad_chunk(batch: int, columns_per_sample: int, itemsize: int = 4) -> int:
  """Samples per step of ``chunked_grad_conv``'s weight-gradient loop: the largest divisor
  of ``batch`` whose im2col columns (``columns_per_sample`` numbers a sample) fit in
  GEMM_GRAD_CHUNK_BYTES, at least 1."""
  limit = max(1, GEMM_GRAD_CHUNK_BYTES // (columns_per_sample * itemsize))
  return max(d for d in range(1, min(limit, batch) + 1) if batch % d == 0)


def _chunked_kernel_grad(x, cotangent, kernel_shape, strides, pads, chunk):
  """d loss / d w of a dense (one-group) convolution: the sum over batch chunks of
  ``im2col(x_chunk)^T @ cotangent_chunk``, accumulated in a ``lax.scan``.

  The batch is viewed as (chunk, steps) and each step takes every steps-th sample, so that a
  batch split over devices in contiguous blocks stays split over the chunk axis.
  """
  n = x.shape[0]
  steps = n // chunk
  kh, kw, cin, cout = kernel_shape
  accumulate = jnp.promote_types(cotangent.dtype, jnp.float32)
  xs = x.reshape(chunk, steps, *x.shape[1:])
  cs = cotangent.reshape(chunk, steps, *cotangent.shape[1:])

  def step(total, s):
    xc = lax.dynamic_index_in_dim(xs, s, axis=1, keepdims=False)
    cc = lax.dynamic_index_in_dim(cs, s, axis=1, keepdims=False)
    _, slices = _tap_slices(xc, (kh, kw), strides, pads)
    columns = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
    part = lax.dot_general(
      columns, cc, (((0, 1, 2), (0, 1, 2)), ((), ())), preferred_element_type=accumulate
    )
    return total + part, None

  taps, _ = _tap_slices(x[:1], (kh, kw), strides, pads)
  total = lax.scan(step, jnp.zeros((len(taps) * cin, cout), accumulate), jnp.arange(steps))[0]
  total = total.reshape(len(taps), cin, cout)
  if len(taps) == kh * kw:
    return total.reshape(kernel_shape)
  rows, cols = (jnp.array(t) for t in zip(*taps))
  return jnp.zeros(kernel_shape, accumulate).at[rows, cols].set(total)


def _xla_conv(x, w, strides, pads):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_CHANNELS_LAST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def chunked_grad_conv(x: jax.Array, w: jax.Array, strides, pads) -> jax.Array:
  """XLA's convolution (NHWC x, HWIO w, one group, explicit ``pads``), whose backward pass
  takes XLA's input gradient and computes the kernel gradient as im2col GEMMs over batch
  chunks (``_chunked_kernel_grad``): XLA:CPU's own weight-gradient convolution runs at
  3-4x the forward's time on 28x28 and 14x14 maps (bench/README.md). The backward is made of
  differentiable operations, so gradients of gradients work."""
  return _xla_conv(x, w, strides, pads)


def _chunked_grad_fwd(x, w, strides, pads):
  return _xla_conv(x, w, strides, pads), (x, w)


def _chunked_grad_bwd(strides, pads, residuals, cotangent):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, pads), x)
  (dx,) = input_vjp(cotangent)
  kh, kw, cin, _ = w.shape
  columns = cotangent.shape[1] * cotangent.shape[2] * kh * kw * cin
  chunk = gemm_grad_chunk(x.shape[0], columns, jnp.dtype(x.dtype).itemsize)
  dw = _chunked_kernel_grad(x, cotangent, w.shape, strides, pads, chunk)
  return dx.astype(x.dtype), dw.astype(w.dtype)


chunked_grad_conv.defvjp(_chunked_grad_fwd, _chunked_grad_bwd)


def choose_lowering(
  lowering: str,
  backend: str,
  lhs_shape,
  rhs_shape,
  window_strides,
  padding,
  feature_group_count: int = 1,
) -> str:
  """The lowering ("xla", "shifted_matmul" or "chunked_grad") that ``lowering`` means for
  these static shapes.

  "auto" is XLA's convolution except on CPU, where the shifted-matmul form is taken where
  it is faster forward + backward (bench/conv_lowering.py measures each case):

  * depthwise convolutions (ConvNeXt's 7x7), at every map size;
  * non-overlapping windows, kernel <= stride (strided 1x1 shortcuts, 2x2 patchify
    downsampling);
  * output maps of at most SHIFTED_MATMUL_MAX_SIDE a side (3x3 kernels on 1x1 to 3x3
    maps). From 4x4 up, XLA's convolution is as fast or faster,

  and every other one-group convolution (3x3 on maps of 5x5 and up, stride 1 or 2, and on
  4x4 maps from CHUNKED_GRAD_MIN_CHANNELS input channels; the ImageNet stem's 7x7) is
  "chunked_grad": XLA's forward and input gradient, the kernel gradient as im2col GEMMs over
  batch chunks (1.2-12x faster than XLA's weight-gradient convolution on CPU). 4x4 maps
  with fewer channels stay on XLA, where the GEMMs are too small to win. "auto_xla_grad" is
  this rule with XLA's convolution wherever it takes chunked_grad, to measure what
  chunked_grad gains.

  Either lowering sums in its own order, so float32 results differ by rounding (and float32
  training runs then drift apart like runs on different meshes, bench/mesh_drift.py); in
  float64 they agree to 1e-10 (tests/test_conv.py).
  """
  check_lowering(lowering)
  if lowering not in ('auto', 'auto_xla_grad'):
    return lowering
  if backend != 'cpu':
    return 'xla'
  depthwise = _is_depthwise(lhs_shape, rhs_shape, feature_group_count)
  if feature_group_count != 1 and not depthwise:
    return 'xla'
  spatial, kernel = tuple(lhs_shape[1:3]), tuple(rhs_shape[:2])
  out = output_spatial(
    spatial, kernel, window_strides, explicit_padding(spatial, kernel, window_strides, padding)
  )
  non_overlapping = all(k <= s for k, s in zip(kernel, window_strides))
  tiny = max(out) <= SHIFTED_MATMUL_MAX_SIDE
  if depthwise or non_overlapping or tiny:
    return 'shifted_matmul'
  small_gemm = max(out) <= CHUNKED_GRAD_SMALL_SIDE and lhs_shape[3] < CHUNKED_GRAD_MIN_CHANNELS
  if lowering == 'auto' and feature_group_count == 1 and not small_gemm:
    return 'chunked_grad'
  return 'xla'


def _conv(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
  *,
  lowering: str,
):
  """``lax.conv_general_dilated``'s signature; dispatches on ``choose_lowering``."""
  xla_conv = functools.partial(
    lax.conv_general_dilated,
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  plain = (
    lhs.ndim == 4
    and batch_group_count == 1
    and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
    and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CHANNELS_LAST)
  )
  if not plain:
    if lowering in ('shifted_matmul', 'chunked_grad'):
      raise ValueError(
        f'conv_lowering="{lowering}" needs a 2-D NHWC/HWIO convolution '
        'without dilation or batch groups'
      )
    return xla_conv()
  choice = choose_lowering(
    lowering,
    jax.default_backend(),
    lhs.shape,
    rhs.shape,
    window_strides,
    padding,
    feature_group_count,
  )
  if choice == 'xla':
    return xla_conv()
  if choice == 'chunked_grad':
    if feature_group_count != 1:
      raise ValueError(
        f'conv_lowering="chunked_grad" needs feature_group_count 1, got {feature_group_count}'
      )
    pads = explicit_padding(lhs.shape[1:3], rhs.shape[:2], tuple(window_strides), padding)
    dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    return chunked_grad_conv(lhs, rhs, tuple(window_strides), pads).astype(dtype)
  return shifted_matmul_conv(
    lhs, rhs, window_strides, padding, feature_group_count, precision, preferred_element_type
  )


@functools.cache
def conv_general_dilated(lowering: str = 'auto'):
  """A ``lax.conv_general_dilated`` replacement for ``nn.Conv(conv_general_dilated=...)``
  that lowers each call as ``lowering`` ("auto", "xla" or "shifted_matmul") says."""
  check_lowering(lowering)
  return functools.partial(_conv, lowering=lowering)


def conv_module(lowering: str = 'auto'):
  """``nn.Conv`` with its convolution lowered as ``lowering`` says; same parameters."""
  return functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated(lowering))
