"""FullGrad (Srinivas & Fleuret 2019) of any Flax linen model, without changing it.

The full-gradient decomposition writes a ReLU network's output as its input gradient times
the input plus, for every layer with a bias, the bias times the gradient at that layer's
output. FullGrad's map sums the parts' magnitudes, each at image size:

    |dS/dx * x|  +  sum over bias layers l, channels c of  |b_c * dS/dz_l[..., c]|

with each channel min-max scaled on its own before the sum (pytorch-grad-cam's
`scale_accross_batch_and_channels`, `(v - min) / (1e-7 + max)`), the layers' sums upsampled
to the image. As in pytorch-grad-cam and the paper's code, the bias layers are the 2-D ones:
every `nn.Conv` with a bias and every BatchNorm (`nn.BatchNorm`, our `CustomVjpBatchNorm`)
in evaluation mode, whose bias is `beta - mean * gamma / sqrt(var + eps)`; a dense layer's
bias has no spatial extent and is left out. The gradients at the layers' outputs come from
one VJP: each bias layer's output gets a zero added while the model is traced
(`nn.intercept_methods`), and the gradient with respect to that zero is the layer's.

Supported: linen modules (ours, `LinenModel`, imported models). NNX, Equinox and
`FunctionsModel` adapters are refused: their layers cannot be intercepted by type.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bcam_jax import cam
from bcam_jax.models import batch_norm

# pytorch-grad-cam's `scale_cam_image` denominator: (v - min) / (EPS + max(v - min)).
EPS = 1e-7
_BATCH_NORMS = (nn.BatchNorm, batch_norm.CustomVjpBatchNorm)


def layer_bias(module: nn.Module, kwargs: dict) -> jax.Array | None:
  """The per-channel bias a call of `module` adds, or None for a layer without one: a
  `nn.Conv`'s bias, a BatchNorm's `beta - mean * gamma / sqrt(var + eps)` (running
  statistics; ValueError in training mode, where the shift depends on the batch)."""
  variables = module.variables
  params = variables.get('params', {})
  if isinstance(module, nn.Conv):
    return params.get('bias')
  if not isinstance(module, _BATCH_NORMS):
    return None
  running = getattr(module, 'use_running_average', None)
  if isinstance(module, nn.BatchNorm):
    running = nn.merge_param('use_running_average', running, kwargs.get('use_running_average'))
    if module.axis != -1:
      raise ValueError(
        f'full_grad needs BatchNorm over the last axis; {"/".join(module.path)} has '
        f'axis={module.axis}'
      )
  if not running:
    raise ValueError(
      f'full_grad needs BatchNorm in evaluation mode (running statistics); '
      f'{"/".join(module.path)} normalises by the batch'
    )
  stats = variables['batch_stats']
  scale = params.get('scale', 1.0)
  inv = jax.lax.rsqrt(stats['var'] + module.epsilon)
  return params.get('bias', 0.0) - stats['mean'] * scale * inv


def _bias_layers(deltas, found: list):
  """An interceptor context adding `deltas[i]` to the i-th bias layer's NHWC output (None:
  nothing added) and appending `(bias, output shape)` of each to `found`."""
  active = []  # a bias layer calling its parent class's __call__ is one layer

  def interceptor(next_fun, args, kwargs, context):
    is_call = context.method_name == '__call__'
    if not is_call or active or not isinstance(context.module, (nn.Conv, *_BATCH_NORMS)):
      return next_fun(*args, **kwargs)
    bias = layer_bias(context.module, kwargs)  # before the call: a training-mode BatchNorm
    active.append(context.module)  # would fail updating its statistics
    out = next_fun(*args, **kwargs)
    active.pop()
    if bias is None or out.ndim != 4:
      return out
    if deltas is not None:
      out = out + deltas[len(found)].astype(out.dtype)
    found.append((bias, jax.ShapeDtypeStruct(out.shape, jnp.float32)))
    return out

  return nn.intercept_methods(interceptor)


def full_gradients(logits_fn, x: jax.Array, targets):
  """(dS/dx `(N, H, W, C)`, [(bias `(K,)`, dS/dz `(N, h, w, K)`) per bias layer]) of the
  target score S of `logits_fn(x) -> (N, classes)` (a linen apply), for the whole batch in
  one VJP. ValueError when the model has no 2-D bias layer."""
  probe = []
  with _bias_layers(None, probe):
    jax.eval_shape(lambda v: logits_fn(v), x)
  if not probe:
    raise ValueError(
      'full_grad found no bias layer: it reads the biases of nn.Conv and BatchNorm layers '
      'of a Flax linen model'
    )
  zeros = [jnp.zeros(shape.shape, shape.dtype) for _, shape in probe]

  def scores(inputs, deltas):
    found = []
    with _bias_layers(deltas, found):
      values = cam.target_scores(cam.at_least_float32(logits_fn(inputs)), targets)
    return values, [cam.at_least_float32(bias) for bias, _ in found]

  values, vjp, biases = jax.vjp(scores, x, zeros, has_aux=True)
  input_grads, layer_grads = vjp(jnp.ones_like(values))
  return input_grads, list(zip(biases, layer_grads, strict=True))


def _channel_scaled_sum(parts: jax.Array) -> jax.Array:
  """`(N, h, w, K)` -> `(N, h, w)`: each channel min-max scaled, then summed."""
  low = jnp.min(parts, axis=(1, 2), keepdims=True)
  shifted = parts - low
  return jnp.sum(shifted / (EPS + jnp.max(shifted, axis=(1, 2), keepdims=True)), axis=-1)


def full_grad(logits_fn, x: jax.Array, targets) -> jax.Array:
  """FullGrad maps `(N, H, W)` at the input's resolution (not scaled to [0, 1]) of the
  model input `x` `(N, H, W, C)`: the input-gradient part and every bias layer's part,
  channels scaled one by one, summed."""
  input_grads, layers = full_gradients(logits_fn, x, targets)
  size = x.shape[1:3]
  total = _channel_scaled_sum(jnp.abs(cam.at_least_float32(input_grads * x)))
  for bias, grads in layers:
    total = total + cam.upsample_cam(_channel_scaled_sum(jnp.abs(bias * grads)), size)
  return total
