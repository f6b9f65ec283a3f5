"""Device mesh and shardings for data-parallel training with `jax.jit`.

Parameters and optimiser state are replicated; every batch is split over the `data` axis.
The same code runs on one CPU, one GPU or all devices of a host: nothing downstream
depends on the device count, because reductions over the sharded batch are global.
"""
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the `data` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(batch_size: int, mesh: Mesh, field: str) -> None:
  """Fail early when a global batch cannot be split evenly over the devices."""
  n = mesh.devices.size
  if batch_size <= 0 or batch_size % n:
    raise ValueError(
        f'{field}={batch_size} must be a positive multiple of the number of devices '
        f'({n}); e.g. {max(n, (batch_size // n) * n or n)}.')


def shard_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Places host arrays (this process's part of a global batch) on the mesh."""
  sharding = batch_sharded(mesh)
  return tuple(jax.make_array_from_process_local_data(sharding, a) for a in arrays)
