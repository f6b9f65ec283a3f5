"""Orbax checkpoints of a run: the latest K train states, plus the best model by accuracy.

`<workdir>/checkpoints/<step>` holds full train states (parameters, BatchNorm statistics,
optimiser state, step) every N steps and at the end; a restarted run resumes from the
latest. `<workdir>/checkpoints_best/<step>` holds the model variables with the best
validation accuracy so far. Orbax writes each step to a temporary directory and renames it
when complete, so a run killed while saving leaves the previous checkpoints intact. A
checkpoint that cannot be restored all the same (a disk fault, a truncated copy) while an
older one can is moved to `<workdir>/checkpoints_unreadable/` with a warning, and the older
one is used.
"""

import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

LATEST_DIR = 'checkpoints'
BEST_DIR = 'checkpoints_best'
UNREADABLE_DIR = 'checkpoints_unreadable'
BEST_METRIC = 'val_accuracy'


class NoUsableCheckpointError(RuntimeError):
  """Every train-state checkpoint of a workdir failed to restore."""


class NoCheckpointError(FileNotFoundError):
  """A workdir without the checkpoint asked for (nothing trained or validated there yet)."""


def _no_checkpoint(workdir: str, checkpoint: str) -> NoCheckpointError:
  if checkpoint == 'best':
    return NoCheckpointError(
      f'no best checkpoint in {os.path.join(workdir, BEST_DIR)}: no validation has run in '
      f'{workdir} yet (train it with train.py --workdir=..., or evaluate its latest train '
      'state with --config.eval.checkpoint=last).'
    )
  return NoCheckpointError(
    f'no checkpoint in {os.path.join(workdir, LATEST_DIR)}: nothing has been trained in '
    f'{workdir} yet (train it with train.py --workdir=...).'
  )


def require_checkpoint(workdir: str, checkpoint: str) -> None:
  """NoCheckpointError when `workdir` has no saved step of its `best` or `last`
  checkpoints, found without starting Orbax (whose background threads a program ending on
  the error would interrupt)."""
  directory = os.path.join(workdir, BEST_DIR if checkpoint == 'best' else LATEST_DIR)
  if not os.path.isdir(directory) or not any(n.isdigit() for n in os.listdir(directory)):
    raise _no_checkpoint(workdir, checkpoint)


def _barriers(prefix: str) -> ocp.options.MultiprocessingOptions:
  """Own barrier names per manager: in a multi-process job both managers may save the
  same step at once, and Orbax names its cross-process barriers by step."""
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)


class Checkpoints:
  """The two checkpoint managers of one workdir."""

  def __init__(self, workdir: str, keep: int = 3):
    workdir = os.path.abspath(workdir)
    self.workdir = workdir
    self.latest = ocp.CheckpointManager(
      os.path.join(workdir, LATEST_DIR),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        cleanup_tmp_directories=True,
        multiprocessing_options=_barriers(LATEST_DIR),
      ),
    )
    self.best = ocp.CheckpointManager(
      os.path.join(workdir, BEST_DIR),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda m: m[BEST_METRIC],
        best_mode='max',
        cleanup_tmp_directories=True,
        multiprocessing_options=_barriers(BEST_DIR),
      ),
    )

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Saves the train state (asynchronously: device arrays are copied first)."""
    self.latest.save(step, args=ocp.args.StandardSave(state), force=True)

  def save_best(self, step: int, model_vars: Any, val_accuracy: float) -> None:
    """Offers model variables to the best-by-accuracy manager (kept if best so far).

    A step it already holds is left as it is: a run resumed from an older train state
    replays that step and its validation bit for bit, so the saved variables are the ones
    it would save again.
    """
    if step in self.best.all_steps():
      return
    self.best.save(
      step,
      args=ocp.args.StandardSave(model_vars),
      metrics={BEST_METRIC: float(val_accuracy)},
      force=True,
    )

  def restore_latest(self, abstract_state: Any) -> Any | None:
    """The newest train state that restores, laid out like `abstract_state`; None if
    there is no checkpoint.

    The newest checkpoints that fail to restore, when an older one restores with the same
    target (so the target is right and those files are damaged), are logged with their
    step and the cause and moved to `<workdir>/checkpoints_unreadable/` (kept, not
    deleted). When none restores, nothing is moved (a changed model fails on every step
    alike) and NoUsableCheckpointError names the workdir and each step's cause.
    """
    failures = {}
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        state = self.latest.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as error:  # pylint: disable=broad-except
        failures[step] = _first_line(error)
        continue
      for bad, cause in failures.items():
        logging.warning(
          'Checkpoint %s/%d cannot be restored (%s); moved to %s. Resuming from step %d.',
          self.latest.directory,
          bad,
          cause,
          self._move_aside(bad),
          step,
        )
      if failures:
        self.latest.reload()
      return state
    if failures:
      raise NoUsableCheckpointError(
        f'No train-state checkpoint in {self.workdir} can be restored ('
        + '; '.join(f'step {s}: {c}' for s, c in failures.items())
        + '). Nothing was '
        'moved: if the model or optimizer changed, use the config this workdir was trained '
        'with; if the files are damaged, start over in a new --workdir.'
      )
    return None

  def _move_aside(self, step: int) -> str:
    """Moves checkpoint `step` out of the manager's directory; returns where to."""
    target = os.path.join(self.workdir, UNREADABLE_DIR, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(os.path.join(str(self.latest.directory), str(step)), target)
    if jax.process_count() > 1:  # the others see the move before they look again
      ocp.multihost.sync_global_processes(f'bcam_move_aside_{step}')
    return target

  def restore_latest_variables(self, abstract_vars: Any) -> tuple[Any, int]:
    """The model variables (`params`, `batch_stats`) of the newest train state, and its
    step, read without its optimiser state: no optimiser needs to be built to evaluate."""
    step = self.latest.latest_step()
    if step is None:
      raise _no_checkpoint(os.path.dirname(self.latest.directory), 'last')
    args = ocp.args.PyTreeRestore(
      abstract_vars,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_vars),
      partial_restore=True,
    )
    return self.latest.restore(step, args=args), step

  def restore_best(self, abstract_vars: Any) -> tuple[Any, int]:
    """Model variables with the best validation accuracy, and their step."""
    step = self.best.best_step()
    if step is None:
      raise _no_checkpoint(os.path.dirname(self.best.directory), 'best')
    return self.best.restore(step, args=ocp.args.StandardRestore(abstract_vars)), step

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _first_line(error: BaseException) -> str:
  """The error's type and first line: Orbax's messages can run to a tree dump."""
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:300] if text else ""}'
