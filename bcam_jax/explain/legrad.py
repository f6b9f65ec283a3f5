"""LeGrad (Bousselham et al. 2024) of our Vision Transformers, without changing them.

LeGrad asks how sensitive each block's own prediction is to that block's attention. For
every block l it reads the block's output tokens Z^l as the network's final stage would,
the class scores s^l = classifier(final_norm(mean over tokens of Z^l)), and takes the
gradient of the target's score with respect to the block's post-softmax attention
A^l `(N, heads, queries, keys)`. The positive part is averaged over heads and queries, the
class token's key dropped, the rest laid out as the patch grid; the map is the mean over the
blocks:

    map = mean over l of  mean over heads h, queries q of  ReLU(d s^l_t / d A^l[h, q, k])

As TorchCAM 0.5.0's `LeGrad` (the reference here, equal on a torchvision twin): tokens
averaged (class token included) before the final norm, attention values not multiplied
into the gradients, every block's map at the patch grid and plain mean over blocks. The
paper's code (WalBouss/LeGrad, for CLIP) also averages before the norm; it takes only the
last blocks (`layer_index=-2` by default: `blocks=2` here), scores by the similarity to a
text embedding, and sums the maps upsampled to the image before min-max scaling (what
`Explainer.maps` makes of the mean). The registered method uses every block.

How, in one forward and one backward pass for the whole batch: while the model is traced
(`nn.intercept_methods`) each block's input passes `jax.lax.stop_gradient`, so a block's
scores reach only its own attention; each block's output is recorded, its attention's
values (the fused `qkv` output) too, and a zero is added to the input of its output
projection `proj`, the heads' outputs out = sum over k of A[h, q, k] v[k, h]. The sum over
blocks of the targets' scores then has, at block l's zero, G^l = d s^l / d out^l, and
d s^l / d A^l[h, q, k] = G^l[q, h] . v^l[k, h], the gradient autodiff would give at the
softmax's output. The model's parameters and numerics are untouched.

Supported: our `ViTS16` / `ViTB16` with the default head (the class token through the final
norm and classifier, timm's and torchvision's layout). Other models are refused by
`check_model`: Soft-CAM and CA-Stream heads do not read one pooled token vector, and other
models expose no attention to differentiate.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bcam_jax import cam
from bcam_jax.explain import layers
from bcam_jax.models import vit


def check_model(adapter, variables=None) -> vit.ViTS16:
  """The ViT under `adapter` (an `explain.layers` adapter); ValueError for any other model
  or a ViT whose head is not the default class-token one."""
  del variables  # what LeGrad needs is the model's structure
  module = getattr(adapter, 'module', None)
  if not isinstance(adapter, layers.CamModel) or not isinstance(module, vit.ViTS16):
    raise ValueError(
      'method legrad needs one of our Vision Transformers (vit_s16, vit_b16): it '
      "differentiates each block's class scores with respect to that block's attention; "
      f'got {adapter.label()}'
    )
  if not module.kind.default:
    raise ValueError(
      'method legrad needs a ViT with the default head (final norm and classifier on the '
      f'tokens); {module.label()} has head={module.head_type!r}, '
      f'pooling={module.pooling!r}'
    )
  return module


def _tapped(deltas, blocks: list, values: list, outs: list):
  """An interceptor context: every `vit.Block`'s input stopped from gradients and its output
  appended to `blocks`; in every attention, the `qkv` output appended to `values` and
  `deltas[i]` added to the i-th `proj` input (None: nothing added), whose shape goes to
  `outs`."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if isinstance(module, vit.Block):
      out = next_fun(jax.lax.stop_gradient(args[0]), *args[1:], **kwargs)
      blocks.append(out)
      return out
    if not isinstance(module, nn.Dense) or not isinstance(module.parent, vit.Attention):
      return next_fun(*args, **kwargs)
    if module.name == 'qkv':
      out = next_fun(*args, **kwargs)
      values.append(out)
      return out
    x = args[0]
    if deltas is not None:
      x = x + deltas[len(outs)].astype(x.dtype)
    outs.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
    return next_fun(x, *args[1:], **kwargs)

  return nn.intercept_methods(interceptor)


def layer_logits(model: vit.ViTS16, params, tokens: jax.Array) -> jax.Array:
  """Block output tokens `(N, L, D)` -> class scores `(N, classes)` in at least float32: the
  tokens' mean through the model's final norm and classifier (TorchCAM's projection)."""
  head = params['head_net']
  pooled = jnp.mean(cam.at_least_float32(tokens), axis=1)
  norm = nn.LayerNorm(epsilon=vit.LN_EPSILON, use_fast_variance=False, dtype=pooled.dtype)
  pooled = norm.apply({'params': head['norm']}, pooled)
  return nn.Dense(model.num_classes, dtype=pooled.dtype).apply({'params': head['dense']}, pooled)


def attention_gradients(adapter, variables, x: jax.Array, targets) -> list[jax.Array]:
  """d s^l_t / d A^l `(N, heads, L, L)` of every block l, in block order, for the model
  input `x` `(N, H, W, C)`: the target score of each block's own class scores
  (`layer_logits`) with respect to that block's post-softmax attention. One forward and one
  VJP for the whole batch."""
  model = check_model(adapter)
  probe = ([], [], [])
  with _tapped(None, *probe):
    jax.eval_shape(lambda v: adapter.logits(variables, v), x)
  zeros = [jnp.zeros(shape.shape, shape.dtype) for shape in probe[2]]

  def scores(deltas):
    blocks, values = [], []
    with _tapped(deltas, blocks, values, []):
      adapter.logits(variables, x)
    total = sum(
      cam.target_scores(layer_logits(model, variables['params'], tokens), targets)
      for tokens in blocks
    )
    return total, values

  total, vjp, values = jax.vjp(scores, zeros, has_aux=True)
  (grads,) = vjp(jnp.ones_like(total))
  n, length = x.shape[0], zeros[0].shape[1]
  split = (n, length, model.heads, model.hidden // model.heads)
  return [
    jnp.einsum(
      'nqhd,nkhd->nhqk',
      cam.at_least_float32(g).reshape(split),
      cam.at_least_float32(qkv).reshape(n, length, 3, *split[2:])[:, :, 2],
    )
    for g, qkv in zip(grads, values, strict=True)
  ]


def legrad(adapter, variables, x: jax.Array, targets, blocks: int | None = None) -> jax.Array:
  """LeGrad maps `(N, s, s)` at the patch grid (non-negative, not scaled) of the model input
  `x` `(N, H, W, C)`: the mean over the last `blocks` blocks (None: all) of each block's
  positive attention gradients averaged over heads and queries, class-token key dropped."""
  if blocks is not None and blocks < 1:
    raise ValueError(f'legrad: blocks={blocks}; expected at least one block')
  grads = attention_gradients(adapter, variables, x, targets)
  grads = grads if blocks is None else grads[-blocks:]
  side = math.isqrt(grads[0].shape[-1] - 1)
  maps = [jnp.mean(jax.nn.relu(g), axis=(1, 2))[:, 1:] for g in grads]
  return jnp.mean(jnp.stack(maps), axis=0).reshape(x.shape[0], side, side)
