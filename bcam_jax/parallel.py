"""Device mesh and shardings for data-parallel training with `jax.jit`.

Parameters and optimiser state are replicated; every batch is split over the `data` axis.
The same code runs on one CPU, one GPU, all devices of a host or every device of a
multi-process job: nothing downstream depends on the device or process count, because
reductions over the sharded batch are global. In a multi-process job each process feeds
only its own rows of every global batch (`process_rows`).
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(mesh: Mesh, value: np.ndarray) -> jax.Array:
  """A host array that every process holds identically, replicated on all devices."""
  return jax.make_array_from_callback(value.shape, replicated(mesh), lambda index: value[index])


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the `data` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(batch_size: int, mesh: Mesh, field: str) -> None:
  """Fail early when a global batch cannot be split evenly over the devices."""
  n = mesh.devices.size
  if batch_size <= 0 or batch_size % n:
    raise ValueError(
      f'{field}={batch_size} must be a positive multiple of the number of devices '
      f'({n}); e.g. {max(n, (batch_size // n) * n or n)}.'
    )


def process_rows(mesh: Mesh, global_size: int) -> slice:
  """The rows of a global batch that this process's devices hold (all rows with one
  process): each process loads and feeds only these."""
  index_map = batch_sharded(mesh).addressable_devices_indices_map((global_size,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [global_size if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  rows = slice(min(starts), max(stops))
  if rows.stop - rows.start != sum(b - a for a, b in zip(starts, stops)):
    raise ValueError(
      f'the devices of process {jax.process_index()} do not hold one '
      'contiguous block of the batch; build the mesh process by process.'
    )
  return rows


def shard_local(mesh: Mesh, global_size: int, *local_arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Global batch arrays of `global_size` rows from this process's rows of them."""
  sharding = batch_sharded(mesh)
  return tuple(
    jax.make_array_from_process_local_data(sharding, a, (global_size,) + a.shape[1:])
    for a in local_arrays
  )


def shard_batch(mesh: Mesh, *global_arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Places a global batch (the same on every process) on the mesh: each process passes
  on only its own rows (`process_rows`)."""
  size = len(global_arrays[0])
  rows = process_rows(mesh, size)
  return shard_local(mesh, size, *(a[rows] for a in global_arrays))
