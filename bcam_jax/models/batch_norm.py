"""BatchNorm in three forms with one set of variables, so a run can pick the fastest.

Every form keeps ``params`` ``{scale, bias}`` and ``batch_stats`` ``{mean, var}`` (float32,
as ``flax.linen.BatchNorm`` keeps them), uses the running statistics when
``use_running_average`` and updates them with ``momentum`` otherwise, and computes the
statistics and the normalisation in at least float32 (float64 in a float64 model). They
differ only in how a training step computes and differentiates them:

* ``"flax"`` (the default): ``flax.linen.BatchNorm`` with the two-pass variance
  E[(x - E[x])^2]. E[x^2] - E[x]^2 cancels catastrophically when a channel's mean dwarfs
  its spread, and then depends on the reduction order, i.e. on how the batch is sharded.
  Its autodiff saves ``x - mean`` in float32 for the backward pass: in a bfloat16 model,
  twice the bytes of the activation at every BatchNorm.
* ``"flax_fast_variance"``: the same module with ``use_fast_variance=True``: one fused
  reduction of x and x^2 instead of two dependent ones.
* ``"custom_vjp"``: the two-pass statistics with a hand-written backward pass
  (``jax.custom_vjp``) that saves the input in its own dtype (bfloat16 in a bfloat16
  model) and the float32 per-channel mean and 1/std, and recomputes the normalised input
  from them, as cuDNN's BatchNorm does.

All three give the same values up to rounding (float64: equal to about 1e-12;
tests/test_batch_norm.py). Which is fastest is a property of the accelerator:
``bench/gpu/speed.py --variants=batch_norm=...`` times them against each other.
"""

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

BATCH_NORMS = ('flax', 'flax_fast_variance', 'custom_vjp')


def _statistics_dtype(x):
  """At least float32, as flax's ``force_float32_reductions``; float64 stays float64."""
  return jnp.promote_types(x.dtype, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalize_batch(x, scale, bias, epsilon: float, axes: tuple[int, ...], out_dtype):
  """Batch-normalised ``x`` (``out_dtype``) and the batch's mean and (biased) variance over
  ``axes``; ``scale`` and ``bias`` are broadcast against ``x``."""
  y, mean, var, _ = _normalize_batch_forward(x, scale, bias, epsilon, axes, out_dtype)
  return y, mean, var


def _normalize_batch_forward(x, scale, bias, epsilon, axes, out_dtype):
  xc = x.astype(_statistics_dtype(x))
  mean = xc.mean(axes, keepdims=True)
  centred = xc - mean
  var = jnp.square(centred).mean(axes, keepdims=True)
  inv = jax.lax.rsqrt(var + epsilon)
  y = centred * (inv * scale) + bias
  return y.astype(out_dtype), jnp.squeeze(mean, axes), jnp.squeeze(var, axes), (mean, inv)


def _normalize_batch_fwd(x, scale, bias, epsilon, axes, out_dtype):
  y, mean, var, (mean_kept, inv) = _normalize_batch_forward(
    x, scale, bias, epsilon, axes, out_dtype
  )
  # Residuals: x in its own dtype and per-channel statistics; never a full-size float32.
  return (y, mean, var), (x, scale, bias, mean_kept, inv)


def _normalize_batch_bwd(epsilon, axes, out_dtype, residuals, cotangents):
  del epsilon, out_dtype
  x, scale, bias, mean, inv = residuals
  dy, dmean, dvar = cotangents
  n = math.prod(x.shape[a] for a in axes)
  centred = x.astype(_statistics_dtype(x)) - mean
  xhat = centred * inv
  dy = dy.astype(jnp.result_type(xhat, scale))
  dbias = dy.sum(axes, keepdims=True)
  dscale = (dy * xhat).sum(axes, keepdims=True)
  dx = (scale * inv / n) * (n * dy - dbias - xhat * dscale)
  # The statistics are outputs too (the running averages use them): d mean / dx = 1/n and
  # d var / dx = 2 (x - mean) / n, the mean's own dependence cancelling in the two-pass form.
  dx = dx + (jnp.expand_dims(dmean, axes) + 2 * jnp.expand_dims(dvar, axes) * centred) / n
  return (
    dx.astype(x.dtype),
    jnp.reshape(dscale, scale.shape).astype(scale.dtype),
    jnp.reshape(dbias, bias.shape).astype(bias.dtype),
  )


normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


class CustomVjpBatchNorm(nn.Module):
  """BatchNorm over the last axis whose training step is ``normalize_batch``: the variables,
  initialisers and running-average update of ``flax.linen.BatchNorm``."""

  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: jnp.dtype | None = None
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    scale = self.param('scale', self.scale_init, (features,), jnp.float32)
    bias = self.param('bias', self.bias_init, (features,), jnp.float32)
    out_dtype = self.dtype or jnp.result_type(x, scale, bias)
    if self.use_running_average:
      inv = jax.lax.rsqrt(ra_var.value + self.epsilon)
      return ((x - ra_mean.value) * (inv * scale) + bias).astype(out_dtype)
    y, mean, var = normalize_batch(x, scale, bias, self.epsilon, axes, out_dtype)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


def batch_norm(
  variant: str,
  *,
  train: bool,
  momentum: float,
  epsilon: float,
  dtype,
  scale_init: Callable = nn.initializers.ones,
  name: str | None = None,
) -> nn.Module:
  """The BatchNorm module of ``variant`` (one of ``BATCH_NORMS``) over the last axis."""
  if variant == 'custom_vjp':
    return CustomVjpBatchNorm(not train, momentum, epsilon, dtype, scale_init=scale_init, name=name)
  if variant not in BATCH_NORMS:
    raise ValueError(f'batch_norm must be one of {BATCH_NORMS}, got {variant!r}')
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=momentum,
    epsilon=epsilon,
    use_fast_variance=variant == 'flax_fast_variance',
    dtype=dtype,
    scale_init=scale_init,
    name=name,
  )
