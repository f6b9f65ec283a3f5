"""Every convolution of every model, timed forward + backward in both lowerings.

Collects the distinct convolutions (input shape, kernel, stride, padding, groups) that a
model's forward pass runs, by intercepting `nn.Conv` calls, then times each one's
forward + backward (gradients with respect to input and kernel, as training needs; the
kernel only for the first layer, whose input is the image) with
XLA's convolution, with the shifted-matmul form of `bcam_jax.models.conv` and (one-group
convolutions) with its chunked_grad form (XLA forward and input gradient, kernel gradient as
im2col GEMMs over batch chunks), alternately in one run. The ratio columns are what
`conv.choose_lowering`'s "auto" rule is set from.

  python bench/conv_lowering.py                        # all models, batch 128, 28x28
  python bench/conv_lowering.py --models=resnet18 --size=112 --batch=32
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
from bcam_jax import models  # noqa: E402
from bcam_jax.models import conv  # noqa: E402
from bench import common  # noqa: E402

_MODELS = flags.DEFINE_list('models', list(common.MODEL_VARIANTS), 'Models to scan.')
_SIZE = flags.DEFINE_integer('size', 28, 'Image side.')
_BATCH = flags.DEFINE_integer('batch', 128, 'Batch size.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per lowering and convolution.')
_OUT = flags.DEFINE_string('out', 'bench/results/conv_lowering_28_b128.json', 'JSON output.')


def model_convolutions(name: str, options: dict, size: int, batch: int) -> list[dict]:
  """The distinct convolutions of the model's forward pass, with how often each runs."""
  model = models.get_model(name, 10, **options)
  seen = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Conv) and context.method_name == '__call__':
      x = args[0]
      spec = dict(
        input=tuple(x.shape),
        kernel=tuple(module.kernel_size),
        features=module.features,
        strides=tuple(int(s) for s in np.broadcast_to(module.strides, 2)),
        padding=module.padding
        if isinstance(module.padding, str)
        else int(np.ravel(module.padding)[0]),
        groups=module.feature_group_count,
      )
      key = json.dumps(spec)
      seen[key] = seen.get(key, 0) + 1
    return next_fun(*args, **kwargs)

  images = jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  return [dict(json.loads(k), count=n) for k, n in seen.items()]


def _time(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / repeats


def time_convolution(spec: dict, repeats: int) -> dict:
  """Forward + backward seconds of one convolution in each lowering, and GFLOP/s."""
  kh, kw = spec['kernel']
  channels = spec['input'][-1]
  pad = spec['padding']
  padding = pad if isinstance(pad, str) else ((pad, pad), (pad, pad))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(spec['input']), jnp.float32)
  w = jnp.asarray(
    rng.standard_normal((kh, kw, channels // spec['groups'], spec['features'])), jnp.float32
  )
  times, out_shape = {}, None
  fns = {}
  lowerings = ('xla', 'shifted_matmul') + (('chunked_grad',) if spec['groups'] == 1 else ())
  for lowering in lowerings:
    apply = conv.conv_general_dilated(lowering)

    def loss(x, w, apply=apply):
      y = apply(
        x,
        w,
        spec['strides'],
        padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=spec['groups'],
      )
      return jnp.sum(y * y)

    # The first layer's input is the image, whose gradient training never needs.
    argnums = (1,) if channels == 1 else (0, 1)
    fns[lowering] = jax.jit(jax.value_and_grad(loss, argnums=argnums))
    out_shape = jax.eval_shape(
      lambda x, w, apply=apply: apply(
        x,
        w,
        spec['strides'],
        padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=spec['groups'],
      ),
      x,
      w,
    ).shape
  for _ in range(2):  # Alternate, so that load on the machine hits both alike.
    for lowering, fn in fns.items():
      t = _time(fn, (x, w), repeats)
      times[lowering] = min(times.get(lowering, np.inf), t)
  # Forward multiply-adds x 2 flops, x 3 for forward + two backward convolutions (x 2
  # without the input gradient).
  passes = 2 if channels == 1 else 3
  flops = passes * 2 * np.prod(out_shape) * kh * kw * channels // spec['groups']
  auto = conv.choose_lowering(
    'auto', 'cpu', spec['input'], w.shape, spec['strides'], padding, spec['groups']
  )
  return dict(
    spec,
    output=tuple(out_shape),
    xla_s=times['xla'],
    shifted_matmul_s=times['shifted_matmul'],
    xla_gflops=flops / times['xla'] / 1e9,
    shifted_matmul_gflops=flops / times['shifted_matmul'] / 1e9,
    speedup=times['xla'] / times['shifted_matmul'],
    chunked_grad_s=times.get('chunked_grad', np.nan),
    chunked_grad_speedup=times['xla'] / times.get('chunked_grad', np.nan),
    auto=auto,
  )


def main(argv):
  del argv
  rows = []
  print(
    f'{"model":24s} {"input":>18s} {"k":>3s} {"s":>2s} {"g":>4s} {"out":>14s} {"n":>2s} '
    f'{"xla ms":>8s} {"shift ms":>8s} {"xla GF/s":>8s} {"shift GF/s":>10s} '
    f'{"xla/shift":>9s} {"chunk ms":>8s} {"xla/chunk":>9s} auto'
  )
  for variant in _MODELS.value:
    name, options = common.MODEL_VARIANTS[variant]
    for spec in model_convolutions(name, options, _SIZE.value, _BATCH.value):
      row = dict(time_convolution(spec, _REPEATS.value), model=variant)
      rows.append(row)
      print(
        f'{variant:24s} {str(row["input"]):>18s} {row["kernel"][0]:3d} '
        f'{row["strides"][0]:2d} {row["groups"]:4d} {str(row["output"][1:]):>14s} '
        f'{row["count"]:2d} {1e3 * row["xla_s"]:8.2f} {1e3 * row["shifted_matmul_s"]:8.2f} '
        f'{row["xla_gflops"]:8.1f} {row["shifted_matmul_gflops"]:10.1f} '
        f'{row["speedup"]:9.2f} {1e3 * row["chunked_grad_s"]:8.2f} '
        f'{row["chunked_grad_speedup"]:9.2f} {row["auto"]}',
        flush=True,
      )
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(
      {'machine': common.machine_info(), 'size': _SIZE.value, 'batch': _BATCH.value, 'rows': rows},
      f,
      indent=1,
      default=lambda v: v.tolist() if hasattr(v, 'tolist') else str(v),
    )
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
