"""Orbax checkpoints of a run: the latest K train states, plus the best model by accuracy.

`<workdir>/checkpoints/<step>` holds full train states (parameters, BatchNorm statistics,
optimiser state, step) every N steps and at the end; a restarted run resumes from the
latest. `<workdir>/checkpoints_best/<step>` holds the model variables with the best
validation accuracy so far. Orbax writes each step to a temporary directory and renames it
when complete, so a run killed while saving leaves the previous checkpoints intact.
"""
import os
from typing import Any

import orbax.checkpoint as ocp

LATEST_DIR = 'checkpoints'
BEST_DIR = 'checkpoints_best'
BEST_METRIC = 'val_accuracy'


def _barriers(prefix: str) -> ocp.options.MultiprocessingOptions:
  """Own barrier names per manager: in a multi-process job both managers may save the
  same step at once, and Orbax names its cross-process barriers by step."""
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)


class Checkpoints:
  """The two checkpoint managers of one workdir."""

  def __init__(self, workdir: str, keep: int = 3):
    workdir = os.path.abspath(workdir)
    self.latest = ocp.CheckpointManager(
        os.path.join(workdir, LATEST_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, cleanup_tmp_directories=True,
            multiprocessing_options=_barriers(LATEST_DIR)))
    self.best = ocp.CheckpointManager(
        os.path.join(workdir, BEST_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m[BEST_METRIC], best_mode='max',
            cleanup_tmp_directories=True, multiprocessing_options=_barriers(BEST_DIR)))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Saves the train state (asynchronously: device arrays are copied first)."""
    self.latest.save(step, args=ocp.args.StandardSave(state), force=True)

  def save_best(self, step: int, model_vars: Any, val_accuracy: float) -> None:
    """Offers model variables to the best-by-accuracy manager (kept if best so far)."""
    self.best.save(step, args=ocp.args.StandardSave(model_vars),
                   metrics={BEST_METRIC: float(val_accuracy)}, force=True)

  def restore_latest(self, abstract_state: Any) -> Any | None:
    """The latest train state laid out like `abstract_state`, or None if there is none."""
    step = self.latest.latest_step()
    if step is None:
      return None
    return self.latest.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_best(self, abstract_vars: Any) -> tuple[Any, int]:
    """Model variables with the best validation accuracy, and their step."""
    step = self.best.best_step()
    if step is None:
      raise FileNotFoundError(
          f'no best checkpoint in {self.best.directory}: no validation has run yet.')
    return self.best.restore(step, args=ocp.args.StandardRestore(abstract_vars)), step

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
