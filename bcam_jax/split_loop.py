"""The evaluation loop: a jitted step's masked sums over a whole split.

Validation, the final test and every measurement of `eval.py` run the same loop: padded
batches of one shape (`data.eval_batches`), sharded over the mesh's `data` axis, summed on
device, each example counted once.
"""

import time

import jax
import jax.numpy as jnp
from absl import logging

from bcam_jax import data, parallel
from bcam_jax.metric_logging import format_duration


def batch_for_devices(batch_size: int, num_devices: int) -> int:
  """`batch_size` rounded up to a multiple of the device count (every device gets the same
  share; padding is masked out)."""
  return -(-batch_size // num_devices) * num_devices


def sum_over_split(mesh, split: data.Split, batch_size: int, step_fn, *args, progress=None):
  """Host sums of `step_fn(*args, images, labels, mask)` over `split` in padded batches.

  `progress(done)` is called after each batch, once the batch's sums are computed: JAX
  dispatches asynchronously, so without the wait the progress would time the dispatch,
  not the work.
  """
  totals, done = None, 0
  batches = data.prefetched(split, data.eval_batches(split, batch_size))  # read ahead if streamed
  for images, labels, mask in batches:
    sums = step_fn(*args, *parallel.shard_batch(mesh, images, labels, mask))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    done = min(done + batch_size, len(split))
    if progress:
      jax.block_until_ready(totals)
      progress(done)
  return jax.device_get(totals)


def evaluate_split(run, eval_step, variables, split: data.Split, prototypes: jax.Array):
  """(metrics, class maps `(C, S, S)`) of `split` under `run`'s objective
  (`Objective.split_metrics`), from the sums of the jitted `run.eval_step()`; a pass longer
  than 10 s logs its progress (`Progress`)."""
  name = 'validation' if split is run.datasets.val else 'test'
  progress = Progress(name, len(split), quiet_below_s=10.0)
  totals = sum_over_split(
    run.mesh, split, run.eval_batch_size, eval_step, variables, prototypes, progress=progress
  )
  return run.objective.split_metrics(run.model, totals, prototypes)


class Progress:
  """Logs `name: done/total images, rate, ETA` at most every 10 s and at the end; the
  rate leaves out the first batch, which includes compilation. With `quiet_below_s`, a
  pass that ends within that many seconds logs nothing (a short validation stays quiet)."""

  def __init__(self, name: str, total: int, quiet_below_s: float = 0.0):
    self.name, self.total, self.quiet_below_s = name, total, quiet_below_s
    self.start = self.last_log = self.latest = time.time()
    self.first = None  # (images, time) after the first batch

  def __call__(self, done: int) -> None:
    now = self.latest = time.time()
    if self.first is None:
      self.first = (done, now)
    if done < self.total and now - self.last_log < 10:
      return
    if done >= self.total and now - self.start < self.quiet_below_s:
      return
    self.last_log = now
    rate = self.rate(done, now)
    logging.info(
      '%s: %d/%d images, %.1f img/s, ETA %s',
      self.name,
      done,
      self.total,
      rate,
      format_duration((self.total - done) / rate),
    )

  def rate(self, done: int | None = None, now: float | None = None) -> float:
    """Images per second after the first batch (over everything for a single batch), at
    `done` images and time `now`; by default at the last call, so that work done after the
    loop (e.g. compiling the metrics' reduction) does not count."""
    done = self.total if done is None else done
    now = self.latest if now is None else now
    if self.first and done > self.first[0]:
      return (done - self.first[0]) / max(now - self.first[1], 1e-9)
    return done / max(now - self.start, 1e-9)
