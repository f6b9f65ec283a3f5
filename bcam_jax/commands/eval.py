"""Evaluates a trained workdir on the test set and writes `<workdir>/eval/`: metrics.json,
report.md, the figures (confusion, CAM prototypes, error prototypes, overlays) and the same
in TensorBoard (`<workdir>/eval/tensorboard`).

  bcam-eval --workdir=<dir> [--config.eval.checkpoint=last]
      [--config.eval.methods=grad_cam,grad_cam_pp,score_cam,evidence]
      [--config.eval.num_images=1000] [--config.eval.overlay_selection=misclassified]
      [--config.eval.road=True] [--config.eval.sanity_images=16] [--config=<config>]

Without --config, the evaluation uses the config recorded in `<workdir>/config.json` (the one
the run was trained with, every override included); `--config.eval.<field>=...` overrides
still apply. `--config=<a packaged name or a file>` gives a config explicitly, with the
training run's overrides, as for bcam-train. What the evaluation measures is its
`config.eval` section (every field with its meaning: `bcam_jax/configs/base.py`;
`bcam_jax.eval_options.EvalOptions`). In a clone, `python eval.py` is the same command.
The methods are the model's: CA-Stream's `raw_attention`, Soft-CAM's `evidence`, Grad-CAM
for every model.
"""

import dataclasses
import os
import re
import sys

from absl import app, flags, logging

from bcam_jax import cli, eval_lib
from bcam_jax.eval_options import EvalOptions
from bcam_jax.metric_logging import quiet_library_logs
from bcam_jax.run_spec import RunSpec

_CONFIG = cli.define_config_flag('config', 'The config used for training: a name or a file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of the trained run.')
flags.mark_flags_as_required(['config', 'workdir'])

# The flags of the evaluation's options before they moved into config.eval.
_MOVED = {f.name for f in dataclasses.fields(EvalOptions)} | {'batch_size'}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  if f'--config={cli.WORKDIR_CONFIG}' in sys.argv:
    logging.info(
      'Using the config recorded in %s (--config=<config> gives another).',
      os.path.join(_WORKDIR.value, 'config.json'),
    )
  eval_lib.evaluate_and_report(RunSpec.from_config(_CONFIG.value), _WORKDIR.value)


def moved_flags(argv: list[str]) -> list[str]:
  """The `--<option>` flags of `argv` that are now `--config.eval.<field>` overrides, each
  with its replacement, e.g. `--methods=cam is now --config.eval.methods=cam`."""
  found = []
  for arg in argv[1:]:
    match = re.fullmatch(r'--(no)?([a-z_]+)(=.*)?', arg)
    if match and match.group(2) in _MOVED:
      no, name, value = match.groups()
      field = 'method_batch_size' if name == 'batch_size' else name
      value = value or ('=False' if no else '=True')
      found.append(f'{arg} is now --config.eval.{field}{value}')
  return found


def run():
  """The `bcam-eval` console script and the clone's `python eval.py`; without `--config`,
  the config recorded in the workdir (`cli.WORKDIR_CONFIG`)."""
  moved = moved_flags(sys.argv)
  if moved:  # absl would say only "Unknown command line flag"
    sys.exit('error: ' + '; '.join(moved) + ' (every evaluation option is a config.eval field).')
  wants_help = any(arg in cli.HELP_FLAGS for arg in sys.argv[1:])
  if not wants_help and not any(re.match(r'--config(=|$)', arg) for arg in sys.argv[1:]):
    sys.argv.insert(1, f'--config={cli.WORKDIR_CONFIG}')
  cli.run_command(main, __name__)
