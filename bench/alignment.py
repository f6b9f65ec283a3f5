"""Prototype alignment of trained workdirs under every map metric, in one table.

Each run's own results.json measures the explanation terms with the metric it trained with;
to compare a baseline with BCPL runs trained under L1, L2 and SSIM, this script evaluates
the last checkpoint of every workdir on the test set with each metric (test prototype loss,
the mean per-image distance, and test Batch-CAM loss, the distance of the test set's class
CAMs summed over classes; lower = closer to the class prototypes).

  BCAM_DATA_DIR=../shared/data python bench/alignment.py \
      --workdirs=runs/a,runs/b --out=bench/results/alignment.json
"""

import json
import os
import sys

import ml_collections
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bcam_jax import eval_lib, io_utils  # noqa: E402
from bcam_jax import objective as objective_lib  # noqa: E402
from bcam_jax.configs import base  # noqa: E402
from bcam_jax.metric_logging import quiet_library_logs  # noqa: E402

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'Trained workdirs (with config.json).')
_OUT = flags.DEFINE_string('out', 'bench/results/alignment.json', 'JSON output path.')
flags.mark_flags_as_required(['workdirs'])


def main(argv):
  del argv
  quiet_library_logs()
  rows = []
  for workdir in _WORKDIRS.value:
    config = ml_collections.ConfigDict(json.load(open(os.path.join(workdir, 'config.json'))))
    for key, value in base.get_base_config().loss.items():  # runs saved before CAM losses
      if key not in config.loss:
        config.loss[key] = value
    row = {
      'workdir': workdir,
      'dataset': config.data.name,
      'kind': config.loss.kind,
      'train_metric': config.loss.metric,
      'lambda_cam': config.loss.lambda_cam,
    }
    for metric in objective_lib.METRICS:
      config.loss.metric = metric
      result = eval_lib.evaluate_checkpoint(config, workdir, 'last', output_name=None)
      row['test_accuracy'] = result['test_accuracy']
      row[f'proto_{metric}'] = result['test_proto_loss']
      row[f'bcam_{metric}'] = result['test_bcam_loss']
    rows.append(row)
  print(
    f'{"workdir":48} {"acc %":>6} '
    + ' '.join(f'{k + "_" + m:>10}' for k in ('proto', 'bcam') for m in objective_lib.METRICS)
  )
  for r in rows:
    print(
      f'{r["workdir"]:48} {100 * r["test_accuracy"]:6.2f} '
      + ' '.join(
        f'{r[k + "_" + m]:10.4f}' for k in ('proto', 'bcam') for m in objective_lib.METRICS
      )
    )
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  io_utils.write_json(_OUT.value, {'rows': rows})


if __name__ == '__main__':
  app.run(main)
