"""What every benchmark records next to its figures: the machine it ran on."""

import os
import platform

import jax
import numpy as np

from bcam_jax import steps


def machine_info() -> dict:
  """Platform, device kind and count, CPU count, processor and model, JAX version."""
  return {
    'platform': jax.devices()[0].platform,
    'device_kind': jax.devices()[0].device_kind,
    'num_devices': jax.device_count(),
    'cpu_count': os.cpu_count(),
    'processor': platform.processor() or platform.machine(),
    'cpu_model': cpu_model(),
    'jax': jax.__version__,
  }


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (AMD and Intel round differently in places);
  platform.machine() where there is none."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.machine()


_MIB = 2.0**20


def static_memory(compiled) -> dict:
  """XLA's memory estimate of a compiled step in MiB (None where the backend has none):
  arguments + outputs + temporaries, less the donated buffers the outputs alias."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # unsupported on some backends
    stats = None
  if stats is None:
    return {'static_peak_mib': None}
  get = lambda name: float(getattr(stats, name, 0) or 0)
  out = {
    k: get(f'{k}_size_in_bytes') / _MIB
    for k in ('argument', 'output', 'temp', 'alias', 'generated_code')
  }
  out = {f'{k}_mib': v for k, v in out.items()}
  out['static_peak_mib'] = (
    out['argument_mib'] + out['output_mib'] + out['temp_mib'] - out['alias_mib']
  )
  return out


def device_peak_mib():
  """The device's high-water mark of allocated memory in MiB (GPU/TPU), else None. It is
  process-wide and only grows."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return stats['peak_bytes_in_use'] / _MIB


# The models the CPU benchmarks compare: name -> (bcam_jax model name, get_model options).
MODEL_VARIANTS = {
  'simple_cnn': ('simple_cnn', {}),
  'resnet18': ('resnet18', {}),
  'resnet18_imagenet_stem': ('resnet18', {'stem': 'imagenet'}),
  'convnext_v2_tiny': ('convnext_v2_tiny', {}),
}


def train_step_fn(
  model, tx, schedule, objective, info, image_size: int, seed: int = 0, dtype=np.float32
):
  """`steps.make_train_step` of `model` (compute in `dtype`, float32 by default) with the
  dataset's normalisation: the step train.py runs, for benchmarks that build their own
  model and optimiser."""
  return steps.make_train_step(
    model,
    tx,
    schedule,
    objective,
    mean=info.mean,
    std=info.std,
    dtype=dtype,
    image_size=image_size,
    seed=seed,
  )
