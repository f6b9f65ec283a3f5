"""results.md of a reproduction grid (`bcam_jax.grids`): its cells' metrics aggregated over
seeds next to the Batch-CAM paper's tables, and BCPL against the baseline."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from bcam_jax import conditions
from bcam_jax.metric_logging import format_duration
from bcam_jax.report.eval_report import markdown_table

_ORDER = conditions.NAMES  # the paper's conditions, then the ablations


def _fmt(value, digits: int = 2) -> str:
  return '–' if value is None else f'{value:.{digits}f}'


def _accuracy(row) -> str:
  std = row['accuracy_std']
  return _fmt(row['accuracy_mean']) + ('' if std is None else f' ± {std:.2f}')


_TABLE = (
  ('model', lambda r: r['model']),
  ('dataset', lambda r: r['dataset']),
  ('size', lambda r: str(r['image_size'])),
  ('condition', lambda r: r['condition']),
  ('seeds', lambda r: str(r['seeds'])),
  ('epochs', lambda r: str(r['epochs'])),
  ('test acc. %', _accuracy),
  ('paper %', lambda r: _fmt(r['paper_accuracy'])),
  ('Δ paper', lambda r: _fmt(r['difference'])),
  ('align L1 ↓', lambda r: _fmt(r['alignment_l1'], 3)),
  ('align SSIM ↑', lambda r: _fmt(r['alignment_ssim'], 3)),
  ('AD % ↓', lambda r: _fmt(r['average_drop'])),
  ('AI % ↑', lambda r: _fmt(r['average_increase'])),
  ('Ins ↑', lambda r: _fmt(r['insertion'], 3)),
  ('Del ↓', lambda r: _fmt(r['deletion'], 3)),
  ('train img/s', lambda r: _fmt(r['train_images_per_second'], 0)),
  (
    'wall / cell',
    lambda r: '–' if r['wall_seconds'] is None else format_duration(r['wall_seconds']),
  ),
)


def _paper_section(paper: Sequence[dict[str, Any]]) -> list[str]:
  if not paper:
    return []
  lines = [
    '',
    "## Against the paper's tables",
    '',
    'The paper reports, per model and dataset, its best condition. "ours" is our '
    'mean in that condition (or our best condition where we did not run it); '
    '"matches" = within one seed std (0.05 points with one seed).',
    '',
  ]
  return lines + markdown_table(
    ['model', 'dataset', 'size', 'paper best', 'paper %', 'ours %', 'Δ', 'our best', 'verdict'],
    [
      [
        p['model'],
        p['dataset'],
        str(p['image_size']),
        p['paper_condition'],
        _fmt(p['paper_accuracy']),
        _accuracy(p['ours_same_condition'] or p['ours_best']),
        f'{p["gap"]:+.2f}',
        f'{p["ours_best"]["condition"]} {_accuracy(p["ours_best"])}',
        p['verdict'],
      ]
      for p in paper
    ],
  )


def _arrow(pair, digits=3) -> str:
  return f'{_fmt(pair[0], digits)} → {_fmt(pair[1], digits)}'


def _bcpl_section(pairs: Sequence[dict[str, Any]]) -> list[str]:
  if not pairs:
    return []
  table = []
  for p in pairs:
    base_l1, bcpl_l1 = p['alignment_l1']
    ratio = '–' if not (base_l1 and bcpl_l1) else f'{base_l1 / bcpl_l1:.1f}x lower'
    table.append(
      [
        p['model'],
        p['dataset'],
        str(p['image_size']),
        p['bcpl'],
        f'{p["accuracy_gap"]:+.2f}' + ('' if p['accuracy_within_std'] else ' (!)'),
        _arrow(p['alignment_l1']),
        ratio,
        _arrow(p['alignment_ssim']),
        _arrow(p['average_drop'], 2),
        _arrow(p['insertion']),
        _arrow(p['deletion']),
      ]
    )
  lines = [
    '',
    '## BCPL against the baseline',
    '',
    "Alignment is the L1 distance / SSIM between each class's mean Grad-CAM and its "
    'prototype (lower / higher is better); AD and deletion lower, insertion higher is '
    'more faithful.',
    '',
  ]
  lines += markdown_table(
    [
      'model',
      'dataset',
      'size',
      'BCPL',
      'Δ acc. (pts)',
      'align L1 base → BCPL',
      'L1',
      'align SSIM',
      'AD %',
      'Ins',
      'Del',
    ],
    table,
  )
  return lines + ['', '(!) marks a BCPL mean more than one baseline std below the baseline mean.']


def render(
  grid: ml_collections.ConfigDict,
  rows: Sequence[dict[str, Any]],
  pairs: Sequence[dict[str, Any]],
  paper: Sequence[dict[str, Any]],
  figure_names: Sequence[str],
  failures: dict[str, str],
  insertion_deletion: str,
  model_notes: Sequence[str] = (),
) -> str:
  """results.md: the grid, every aggregated row (`grids.aggregate`) next to the paper (with
  `model_notes`, e.g. which models are ours rather than the paper's), the paper's best
  conditions against ours (`grids.against_paper`), BCPL against the baseline
  (`grids.comparisons`), the failed cells and the figures; `insertion_deletion` states the
  insertion/deletion convention (`grids.insertion_deletion_convention`)."""
  blocks = '\n'.join(
    f'- {", ".join(b["models"])} x {", ".join(b["conditions"])} x '
    f'{", ".join(b["datasets"])} at {", ".join(map(str, b["image_sizes"]))} px, seeds '
    f'{", ".join(map(str, b["seeds"]))}, {b["epochs"]} epoch(s)'
    + (f'; overrides {dict(b["overrides"])}' if b.get('overrides') else '')
    for b in grid.blocks
  )
  device = jax.devices()[0]
  default_command = f'python reproduce.py --grid=configs/grids/{grid.name}.py'
  lines = [
    f'# Reproduction grid `{grid.name}`',
    '',
    grid.description.strip(),
    '',
    f'Command: `{grid.get("command", default_command)}`. '
    f'Device: {device.platform} ({device.device_kind}), {jax.device_count()} '
    f'device(s), {os.cpu_count()} CPU core(s), JAX {jax.__version__}. Grad-CAM metrics '
    f'on the first {grid.eval.num_images} test images, best-validation checkpoint; '
    f'insertion/deletion: {insertion_deletion}.',
    '',
    'Cells:',
    '',  # a Markdown list needs a blank line before it (Python-Markdown, the docs site)
    blocks,
    '',
    '## Accuracy and Grad-CAM metrics (mean over seeds)',
    '',
    'Test accuracy is mean ± sample std over seeds. "paper %" is the Batch-CAM '
    "paper's Table 1 (28 px) or Table 2 (112 px) value where the paper reports this "
    'condition (its best condition per model and dataset, and two baselines from its '
    'section 4.1); "Δ paper" is ours minus the paper\'s.',
    '',
  ]
  lines += [line for note in model_notes for line in (note, '')]
  ordered = sorted(
    rows,
    key=lambda r: (r['image_size'], r['dataset'], r['model'], _ORDER.index(r['condition'])),
  )
  lines += markdown_table([h for h, _ in _TABLE], [[f(r) for _, f in _TABLE] for r in ordered])
  lines += _paper_section(paper) + _bcpl_section(pairs)
  if failures:
    lines += ['', '## Failed cells (rerun the grid to retry them)', '']
    lines += [f'- `{name}`: {error}' for name, error in sorted(failures.items())]
  if figure_names:
    lines += ['', '## Class-mean Grad-CAM against the prototypes: baseline above BCPL', '']
    lines += [f'![{name}]({name})' for name in figure_names]
  return '\n'.join(lines) + '\n'
