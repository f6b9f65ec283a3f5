"""Evaluation of a trained workdir: `evaluate_checkpoint` restores and tests a model."""
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

from bcam_jax import io_utils, optim, train_lib
from bcam_jax.checkpointing import Checkpoints

CHECKPOINTS = ('best', 'last')


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        checkpoint: str = 'best',
                        devices: Sequence[jax.Device] | None = None,
                        output_name: str | None = 'metrics.json') -> dict[str, Any]:
  """Test loss, accuracy and prototype alignment (with `config.loss.metric`) of the `best`
  (by validation accuracy) or `last` checkpoint.

  Writes `<workdir>/eval/<output_name>` (unless None) and returns the same dict.
  """
  if checkpoint not in CHECKPOINTS:
    raise ValueError(f'checkpoint={checkpoint!r}; valid: {CHECKPOINTS}')
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'workdir {workdir!r} does not exist: train it first.')
  run = train_lib.setup_run(config, devices)
  tx, _ = optim.make_optimizer(config.optimizer, total_steps=1)
  abstract_state = run.abstract_state(tx)
  ckpts = Checkpoints(workdir)
  try:
    if checkpoint == 'best':
      variables, step = ckpts.restore_best(abstract_state.model_variables())
    else:
      step = ckpts.latest_step()
      if step is None:
        raise FileNotFoundError(f'no checkpoint in {ckpts.latest.directory}.')
      variables = ckpts.restore_latest(abstract_state).model_variables()
  finally:
    ckpts.close()
  prototypes = run.prototypes(workdir)
  test, _ = train_lib.evaluate(run, run.eval_step(), variables, run.datasets.test,
                               prototypes['train'])
  result = {'checkpoint': checkpoint, 'step': int(step), 'test_loss': test['loss'],
            'test_accuracy': test['accuracy'], 'test_count': test['count'],
            'metric': config.loss.metric, 'test_proto_loss': test['proto_loss'],
            'test_bcam_loss': test['bcam_loss']}
  logging.info('%s checkpoint (step %d): test loss %.4f, accuracy %.2f%%', checkpoint,
               step, test['loss'], 100 * test['accuracy'])
  if output_name and jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
    io_utils.write_json(os.path.join(workdir, 'eval', output_name), result)
  return result
