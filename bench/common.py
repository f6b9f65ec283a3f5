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


# The models the CPU benchmarks compare: name -> (bcam_jax model name, get_model options).
MODEL_VARIANTS = {
  'simple_cnn': ('simple_cnn', {}),
  'resnet18': ('resnet18', {}),
  'resnet18_imagenet_stem': ('resnet18', {'stem': 'imagenet'}),
  'convnext_v2_tiny': ('convnext_v2_tiny', {}),
}


def train_step_fn(model, tx, schedule, objective, info, image_size: int, seed: int = 0):
  """`steps.make_train_step` of `model` in float32 with the dataset's normalisation: the
  step train.py runs, for benchmarks that build their own model and optimiser."""
  return steps.make_train_step(
    model,
    tx,
    schedule,
    objective,
    mean=info.mean,
    std=info.std,
    dtype=np.float32,
    image_size=image_size,
    seed=seed,
  )
