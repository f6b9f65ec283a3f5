"""Where a CPU train step's time goes besides convolutions: each other layer family alone.

Times forward + backward (jitted, one op family at the shapes it has inside the models at
batch 128, 28x28) of BatchNorm, max-pooling (flax's reduce_window against our strided-slice
maximum), ConvNeXt's LayerNorm + GELU + GRN block tail, and the Batch-CAM loss tail
(upsample + normalise + L1/SSIM against prototypes), next to the whole bcpl train step of
each model. The convolutions themselves are in bench/conv_lowering.py.

  python bench/hot_spots.py
"""

import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bcam_jax import cam  # noqa: E402
from bcam_jax import objective as objective_lib  # noqa: E402
from bcam_jax.models.convnext import GRN  # noqa: E402
from bcam_jax.models.pooling import max_pool  # noqa: E402
from bench import common  # noqa: E402

_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per op.')
_OUT = flags.DEFINE_string('out', 'bench/results/hot_spots_28_b128.json', 'JSON output.')


def _ms(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return 1e3 * (time.perf_counter() - start) / repeats


def _fwd_bwd(apply, params, x):
  """jit of value and gradient (params and input) of sum(apply(params, x)^2)."""
  return jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.square(apply(p, x))), argnums=(0, 1))), (
    params,
    x,
  )


def _module(module, x):
  params = module.init(jax.random.key(0), x)
  return _fwd_bwd(lambda p, x: module.apply(p, x), params, x)


def cases():
  """(name, jitted function, args) of each op family at a model's shapes."""
  rng = np.random.default_rng(0)

  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)

  bn = nn.BatchNorm(use_running_average=True, use_fast_variance=False)
  out = []
  for shape in ((128, 28, 28, 64), (128, 4, 4, 512)):
    x = normal(*shape)
    variables = bn.init(jax.random.key(0), x)
    train_bn = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    out.append(
      (
        f'BatchNorm (train) {shape}',
        *_fwd_bwd(lambda p, x: train_bn.apply(p, x, mutable=['batch_stats'])[0], variables, x),
      )
    )
  for shape in ((128, 28, 28, 32), (128, 14, 14, 64)):
    x = normal(*shape)
    out.append(
      (
        f'max pool 2x2 reduce_window {shape}',
        *_fwd_bwd(lambda p, x: nn.max_pool(x, (2, 2), (2, 2)), {}, x),
      )
    )
    out.append(
      (
        f'max pool 2x2 strided slices {shape}',
        *_fwd_bwd(lambda p, x: max_pool(x, (2, 2), (2, 2)), {}, x),
      )
    )
  x = normal(128, 28, 28, 96)
  ln = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False)
  out.append(('ConvNeXt LayerNorm (128, 28, 28, 96)', *_module(ln, x)))
  x4 = normal(128, 28, 28, 384)
  out.append(
    (
      'ConvNeXt GELU (128, 28, 28, 384)',
      *_fwd_bwd(lambda p, x: nn.gelu(x, approximate=False), {}, x4),
    )
  )
  out.append(('ConvNeXt GRN (128, 28, 28, 384)', *_module(GRN(jnp.float32), x4)))
  cams, protos = normal(10, 4, 4), jnp.asarray(rng.random((10, 28, 28)), jnp.float32)
  counts = jnp.ones(10)
  for metric in ('l1', 'ssim'):
    out.append(
      (
        f'Batch-CAM loss tail {metric} (10 maps 4x4 -> 28x28)',
        *_fwd_bwd(
          lambda p, m, metric=metric: objective_lib.batch_cam_loss(
            cam.normalize_cam(cam.upsample_cam(m, 28)), counts, protos, metric
          ),
          {},
          cams,
        ),
      )
    )
  return out


def main(argv):
  del argv
  rows = []
  print(f'# {common.machine_info()}')
  print(f'{"op (forward + backward)":60} {"ms":>8}')
  for name, fn, args in cases():
    ms = _ms(fn, *args, repeats=_REPEATS.value)
    rows.append({'op': name, 'ms': ms})
    print(f'{name:60} {ms:8.2f}', flush=True)
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value, 'w', encoding='utf-8') as f:
    json.dump({'machine': common.machine_info(), 'rows': rows}, f, indent=2)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
