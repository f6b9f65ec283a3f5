"""Sweep of lambda_cam for one config, next to its cross-entropy baseline.

The Batch-CAM paper leaves the loss weights unspecified; this script trains the same config
with each lambda_cam (and once with `loss.kind=ce`) through `train_lib.train_and_evaluate`,
one workdir per value (finished ones are reused, interrupted ones resume), and prints test
accuracy and the test explanation terms (lower = CAMs closer to the class prototypes).

  BCAM_DATA_DIR=../shared/data python bench/lambda_sweep.py \
      --config=configs/experiment.py:model=simple_cnn,loss=bcpl --config.train.num_epochs=2 \
      --lambdas=0.1,1,10 --workdir=runs/sweep_simple_cnn_bcpl
"""

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bcam_jax import io_utils, train_lib  # noqa: E402
from bcam_jax.metric_logging import quiet_library_logs  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config with a CAM loss.')
_LAMBDAS = flags.DEFINE_list('lambdas', ['0.1', '1', '10'], 'lambda_cam values.')
_BASELINE = flags.DEFINE_bool('baseline', True, 'Also train loss.kind=ce.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Root directory of the sweep.')
flags.mark_flags_as_required(['config', 'workdir'])


def _run(config, workdir: str) -> dict:
  """Trains (or reuses a finished run in) `workdir`; returns its results.json."""
  results = os.path.join(workdir, 'results.json')
  if not os.path.exists(results):
    start = time.time()
    train_lib.train_and_evaluate(config, workdir)
    summary = json.load(open(results))
    summary['wall_seconds'] = time.time() - start
    io_utils.write_json(results, summary)
  return json.load(open(results))


def main(argv):
  del argv
  quiet_library_logs()
  base = _CONFIG.value
  cells = [('ce', 0.0)] if _BASELINE.value else []
  cells += [(base.loss.kind, float(v)) for v in _LAMBDAS.value]
  rows = []
  for kind, lam in cells:
    config = base.copy_and_resolve_references()
    config.loss.kind = kind
    config.loss.lambda_cam = lam
    name = 'ce' if kind == 'ce' else f'{kind}_{config.loss.metric}_lambda{lam:g}'
    result = _run(config, os.path.join(_WORKDIR.value, name))
    rows.append({'run': name, 'lambda_cam': lam, **result})
  print(f'{"run":28} {"test acc %":>10} {"proto loss":>10} {"bcam loss":>10} {"wall s":>8}')
  for r in rows:
    print(
      f'{r["run"]:28} {100 * r["test_accuracy"]:10.2f} {r["test_proto_loss"]:10.4f} '
      f'{r["test_bcam_loss"]:10.4f} {r.get("wall_seconds", float("nan")):8.0f}'
    )
  io_utils.write_json(
    os.path.join(_WORKDIR.value, 'sweep.json'), {'config': json.loads(base.to_json()), 'rows': rows}
  )


if __name__ == '__main__':
  app.run(main)
