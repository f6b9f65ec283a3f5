"""Joining a multi-process (multi-host) job: `jax.distributed.initialize`, when it applies.

Every process of a cluster job runs the same `train.py`; JAX's multi-controller runtime
joins them, after which `jax.devices()` lists the devices of every process and one jitted
step runs over all of them. `initialize` decides from explicit settings, environment
variables or the cluster's own variables whether this is such a job:

* explicit: `coordinator_address` (host:port of process 0), `num_processes`, `process_id`
  (train.py's flags of the same names), or the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
* detected by JAX itself: a Slurm job step with several tasks (SLURM_NTASKS > 1), a
  multi-host Cloud TPU VM (TPU_WORKER_HOSTNAMES lists several hosts), or Kubernetes / MPI
  launchers JAX knows (JAX_DISTRIBUTED_AUTODETECT=1 forces the attempt);
* otherwise a single-process run: nothing to do, no flag needed.

On CPU, cross-process collectives use gloo. Call this before any other JAX call.
"""

import os

import jax
from absl import logging

ENV = {
  'coordinator_address': 'JAX_COORDINATOR_ADDRESS',
  'num_processes': 'JAX_NUM_PROCESSES',
  'process_id': 'JAX_PROCESS_ID',
}


def _cluster_detected() -> bool:
  if os.environ.get('JAX_DISTRIBUTED_AUTODETECT') == '1':
    return True
  if int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1 and 'SLURM_JOB_ID' in os.environ:
    return True
  return len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1


def settings(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> dict:
  """Explicit settings, each from its argument or else its environment variable."""
  given = {
    'coordinator_address': coordinator_address,
    'num_processes': num_processes,
    'process_id': process_id,
  }
  for key, var in ENV.items():
    if given[key] is None and os.environ.get(var):
      value = os.environ[var]
      given[key] = value if key == 'coordinator_address' else int(value)
  return {k: v for k, v in given.items() if v is not None}


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Joins the job when settings or a cluster say there is one; True if it did."""
  explicit = settings(coordinator_address, num_processes, process_id)
  if explicit and set(explicit) != set(ENV):
    missing = sorted(set(ENV) - set(explicit))
    raise ValueError(
      f'multi-process settings are incomplete: {explicit} given, '
      f'{", ".join(missing)} missing (flags --{" --".join(missing)} or '
      f'environment {", ".join(ENV[m] for m in missing)}).'
    )
  if not explicit and not _cluster_detected():
    return False
  if explicit and explicit['num_processes'] < 1:
    raise ValueError(f'num_processes={explicit["num_processes"]}; expected >= 1.')
  # gloo for collectives between CPU processes (ignored by GPU/TPU backends).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**explicit)
  logging.info(
    'Joined a %d-process job as process %d: %d local of %d devices.',
    jax.process_count(),
    jax.process_index(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True
