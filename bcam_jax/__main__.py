"""`python -m bcam_jax`: what this installation would run with, for a bug report or a first
check on a new machine: versions, the devices JAX sees, and where data would be read from."""

import importlib.metadata
import platform

import jax

import bcam_jax
from bcam_jax import data

_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-datasets')


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return 'not installed'


def report() -> str:
  """The report as text, one `name: value` line each."""
  lines = [
    f'bcam-jax {bcam_jax.__version__} ({bcam_jax.__file__})',
    f'python {platform.python_version()} on {platform.platform()}',
    *(f'{package} {_version(package)}' for package in _PACKAGES),
    f'devices: {jax.device_count()} x {jax.devices()[0].device_kind} '
    f'({jax.default_backend()}), {jax.process_count()} process(es)',
    f'data folder: {data.default_root()} (${data.DATA_DIR_ENV} overrides)',
  ]
  for name in sorted(data.DATASETS):
    state = 'cached, verified' if data.is_cached(name) else 'not cached: downloaded on first use'
    lines.append(f'  {name}: {data.dataset_dir(name)} ({state})')
  lines.append(f'download mirrors (${data.download.MIRROR_ENV} first when set):')
  for name in sorted(data.DATASETS):
    lines.append(f'  {name}: ' + ', '.join(data.download.mirrors(name)))
  return '\n'.join(lines)


if __name__ == '__main__':
  print(report())
