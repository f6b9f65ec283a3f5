"""Side-by-side table of eval.py reports: accuracy, alignment and faithfulness per method.

  python bench/compare_evals.py --evals=runs/a/eval,runs/b/eval [--out=table.md]

Each directory holds the metrics.json of `eval.py`; one row per (report, method), the report
named by its directory (by the workdir for a workdir's `eval/`), then the insertion/deletion
conventions the reports used (each with its reports' names where they differ).
"""

import json
import os

from absl import app, flags

_EVALS = flags.DEFINE_list('evals', None, 'eval directories (each with metrics.json).')
_OUT = flags.DEFINE_string('out', None, 'Also write the Markdown table here.')

COLUMNS = (
  ('average_drop', 'AD % ↓', '.2f'),
  ('average_gain', 'AG % ↑', '.2f'),
  ('average_increase', 'AI % ↑', '.2f'),
  ('insertion', 'Ins ↑', '.4f'),
  ('deletion', 'Del ↓', '.4f'),
  ('alignment_l1', 'align L1 ↓', '.4f'),
  ('alignment_ssim', 'align SSIM ↑', '.4f'),
  ('image_l1', 'image L1 ↓', '.4f'),
  ('image_ssim', 'image SSIM ↑', '.4f'),
)


def _convention(m) -> str:
  """A report's insertion/deletion convention; reports written before eval.py recorded it
  used the previous one."""
  return m.get('insertion_deletion') or (
    'insertion from a Gaussian blur of sigma side/10, deletion to black (0 in pixel space), '
    f'{m["n_steps"]} equal steps'
  )


def _report_name(directory: str) -> str:
  """What tells two reports of one condition apart: the directory, or the workdir of
  `<workdir>/eval`."""
  path = os.path.normpath(directory)
  name = os.path.basename(path)
  return os.path.basename(os.path.dirname(path)) if name == 'eval' else name


def table(evals) -> str:
  header = ['report', 'dataset', 'model', 'condition', 'test acc. %', 'method']
  header += [c[1] for c in COLUMNS]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  conventions = {}  # convention: the reports that used it
  for directory in evals:
    with open(os.path.join(directory, 'metrics.json')) as f:
      m = json.load(f)
    conventions.setdefault(_convention(m), []).append(_report_name(directory))
    for method, values in m['methods'].items():
      condition = m.get('condition', m['loss'])  # reports written before 'condition'
      cells = [_report_name(directory), m['dataset'], m['model'], condition]
      cells += [f'{100 * m["test_accuracy"]:.2f}', method]
      cells += [format(values[key], spec) for key, _, spec in COLUMNS]
      lines.append('| ' + ' | '.join(cells) + ' |')
  if len(conventions) == 1:
    used = list(conventions)
  else:
    used = [f'{", ".join(names)}: {convention}' for convention, names in conventions.items()]
  lines += ['', 'Insertion/deletion: ' + '; '.join(used) + '.']
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  text = table(_EVALS.value)
  print(text)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  # Required only when run: importing this module (tests do) must leave the process's flags valid.
  flags.mark_flag_as_required('evals')
  app.run(main)
