"""The paper's experiment grids: every cell through train_lib and eval_lib, against the paper.

A grid (``configs/grids/*.py``) is a list of blocks, each the product models x conditions x
datasets x image sizes x seeds with its epochs and config overrides. Every cell trains in
its own workdir ``<root>/<cell name>`` (``train_lib.train_and_evaluate``, which resumes
from the cell's last checkpoint), is evaluated with Grad-CAM (``eval_lib.evaluate_and_report``
on the best-validation checkpoint) and then writes ``cell.json``; a cell with a
``cell.json`` is skipped, so an interrupted grid resumes where it stopped.
``write_results`` aggregates the cells over seeds into ``results.csv`` and ``results.md``
(next to the paper's Table 1 and 2) and draws baseline against BCPL prototype figures.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import itertools
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from bcam_jax import eval_lib, io_utils, train_lib
from bcam_jax.config_validation import validate_config
from bcam_jax.metric_logging import format_duration
from bcam_jax.report import figures
from bcam_jax.report.markdown import markdown_table

CONDITIONS = ('baseline', 'proto-l1', 'proto-l2', 'proto-ssim', 'bcpl-l1', 'bcpl-l2', 'bcpl-ssim')
BLOCK_FIELDS = ('models', 'conditions', 'datasets', 'image_sizes', 'seeds', 'epochs')

# Batch-CAM paper, Table 1 (28x28) and Table 2 (112x112): best condition and its test
# accuracy (%) per (model, dataset, image size); section 4.1 also gives two baselines.
PAPER_BEST = {
  ('convnext_v2_tiny', 'mnist', 28): ('bcpl-l1', 99.72),
  ('convnext_v2_tiny', 'fashion_mnist', 28): ('baseline', 94.79),
  ('resnet18', 'mnist', 28): ('bcpl-l2', 99.65),
  ('resnet18', 'fashion_mnist', 28): ('bcpl-l2', 94.99),
  ('simple_cnn', 'mnist', 28): ('bcpl-l1', 99.00),
  ('simple_cnn', 'fashion_mnist', 28): ('bcpl-l1', 91.32),
  ('convnext_v2_tiny', 'mnist', 112): ('bcpl-l1', 99.74),
  ('convnext_v2_tiny', 'fashion_mnist', 112): ('bcpl-l1', 95.01),
  ('resnet18', 'mnist', 112): ('bcpl-l1', 99.71),
  ('resnet18', 'fashion_mnist', 112): ('bcpl-l1', 94.99),
}
PAPER_OTHER = {
  ('convnext_v2_tiny', 'mnist', 28, 'baseline'): 99.71,
  ('resnet18', 'fashion_mnist', 28, 'baseline'): 94.82,
}


def paper_accuracy(model: str, dataset: str, size: int, condition: str) -> float | None:
  """The paper's test accuracy (%) for this cell's condition, where the paper gives one."""
  best = PAPER_BEST.get((model, dataset, size))
  if best and best[0] == condition:
    return best[1]
  return PAPER_OTHER.get((model, dataset, size, condition))


@dataclasses.dataclass(frozen=True)
class Cell:
  """One training run of the grid."""

  model: str
  condition: str
  dataset: str
  image_size: int
  seed: int
  epochs: int
  overrides: tuple[tuple[str, Any], ...] = ()

  @property
  def name(self) -> str:
    return f'{self.model}_{self.dataset}_{self.image_size}_{self.condition}_seed{self.seed}'

  @property
  def group(self) -> tuple[str, str, int, str]:
    """The cells that differ only by seed share a group."""
    return (self.model, self.dataset, self.image_size, self.condition)


def _check_choice(field: str, value, valid: Sequence) -> None:
  if value not in valid:
    raise ValueError(f'grid: {field}={value!r}; valid: {", ".join(map(str, valid))}')


def expand(grid: ml_collections.ConfigDict) -> list[Cell]:
  """The cells of every block of ``grid``, each once, ordered by seed (then by block), so
  that a grid stopped half-way has the first seed of every condition."""
  cells = []
  for index, block in enumerate(grid.blocks):
    missing = [f for f in BLOCK_FIELDS if f not in block]
    if missing:
      raise ValueError(
        f'grid {grid.name!r}, block {index}: missing field(s) '
        f'{", ".join(missing)}; each block needs {", ".join(BLOCK_FIELDS)}'
      )
    overrides = tuple(sorted(dict(block.get('overrides', {})).items()))
    for model, condition, dataset, size, seed in itertools.product(
      block['models'], block['conditions'], block['datasets'], block['image_sizes'], block['seeds']
    ):
      _check_choice(f'block {index} condition', condition, CONDITIONS)
      cell = Cell(
        model,
        condition,
        dataset,
        int(size),
        int(seed),
        int(block['epochs']),
        overrides + tuple(sorted(dict(grid.get('overrides', {})).items())),
      )
      if cell not in cells:
        cells.append(cell)
  return sorted(cells, key=lambda c: c.seed)


def _set_field(config: ml_collections.ConfigDict, dotted: str, value) -> None:
  *sections, key = dotted.split('.')
  node = config
  for section in sections:
    if section not in node:
      raise ValueError(f'grid override {dotted!r}: the config has no section {section!r}')
    node = node[section]
  if key not in node and not (sections and sections[-1] == 'options'):
    raise ValueError(f'grid override {dotted!r}: the config has no field {key!r}')
  node[key] = value


def cell_config(cell: Cell) -> ml_collections.ConfigDict:
  """The training config of a cell: ``configs/<model>_<baseline|proto|bcpl>.py`` with the
  cell's metric, dataset, image size, seed and epochs, then the grid's overrides."""
  kind, _, metric = cell.condition.partition('-')
  try:
    module = importlib.import_module(f'configs.{cell.model}_{kind}')
  except ModuleNotFoundError as e:
    raise ValueError(f'grid cell {cell.name}: no config configs/{cell.model}_{kind}.py') from e
  config = module.get_config()
  if metric:
    config.loss.metric = metric
  config.data.name = cell.dataset
  config.data.image_size = cell.image_size
  config.seed = cell.seed
  config.train.num_epochs = cell.epochs
  for dotted, value in cell.overrides:
    _set_field(config, dotted, value)
  validate_config(config)
  return config


def eval_options(grid: ml_collections.ConfigDict) -> eval_lib.EvalOptions:
  """Grad-CAM on the best checkpoint, with the grid's image count and step count."""
  return eval_lib.EvalOptions(
    methods=('grad_cam',),
    num_images=grid.eval.num_images,
    n_steps=grid.eval.n_steps,
    num_overlays=4,
    num_error_pairs=4,
  )


def _train_images_per_second(workdir: str) -> float | None:
  """Median of the training throughput the run logged (evaluation pauses excluded)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    rates = [
      r['images_per_second']
      for r in map(json.loads, f)
      if r.get('split') == 'train' and 'images_per_second' in r
    ]
  return float(np.median(rates)) if rates else None


def run_cell(
  cell: Cell,
  workdir: str,
  options: eval_lib.EvalOptions,
  devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
  """Trains (or resumes) and evaluates one cell; returns and writes its ``cell.json``."""
  config = cell_config(cell)
  start = time.time()
  train_lib.train_and_evaluate(config, workdir, devices)
  metrics = eval_lib.evaluate_and_report(config, workdir, options, devices)
  grad_cam = metrics['methods']['grad_cam']
  record = dataclasses.asdict(cell) | {
    'name': cell.name,
    'test_accuracy': 100 * metrics['test_accuracy'],
    'checkpoint_step': metrics['step'],
    **{
      k: grad_cam[k]
      for k in (
        'alignment_l1',
        'alignment_ssim',
        'average_drop',
        'average_increase',
        'insertion',
        'deletion',
      )
    },
    'train_images_per_second': _train_images_per_second(workdir),
    'wall_seconds': time.time() - start,
    'device': jax.devices()[0].device_kind,
  }
  record['overrides'] = [list(kv) for kv in cell.overrides]
  if jax.process_index() == 0:
    io_utils.write_json(os.path.join(workdir, 'cell.json'), record)
  return record


def run_grid(
  grid: ml_collections.ConfigDict, root: str, devices: Sequence[jax.Device] | None = None
) -> tuple[list[dict[str, Any]], dict[str, str]]:
  """Runs every cell of ``grid`` not finished yet under ``root``.

  Returns the records of all finished cells and, by cell name, the errors of the cells that
  failed (bad data path, non-finite loss, ...): a failing cell is logged and the grid goes
  on with the next one, and rerunning the grid retries it.
  """
  cells = expand(grid)
  options = eval_options(grid)
  records, failures, start, ran = [], {}, time.time(), 0
  for i, cell in enumerate(cells, start=1):
    workdir = os.path.join(root, cell.name)
    done = os.path.join(workdir, 'cell.json')
    if os.path.exists(done):
      with open(done, encoding='utf-8') as f:
        records.append(json.load(f))
      logging.info('[%d/%d] %s: finished before, skipped', i, len(cells), cell.name)
      continue
    logging.info('[%d/%d] %s: training %d epoch(s)', i, len(cells), cell.name, cell.epochs)
    try:
      record = run_cell(cell, workdir, options, devices)
    except Exception as e:  # pylint: disable=broad-except
      failures[cell.name] = f'{type(e).__name__}: {e}'
      logging.exception('[%d/%d] %s failed; going on with the next cell', i, len(cells), cell.name)
      continue
    records.append(record)
    ran += 1
    per_cell = (time.time() - start) / ran
    logging.info(
      '[%d/%d] %s: test accuracy %.2f%%, Grad-CAM alignment L1 %.3f, %s; grid ETA %s',
      i,
      len(cells),
      cell.name,
      record['test_accuracy'],
      record['alignment_l1'],
      format_duration(record['wall_seconds']),
      format_duration(per_cell * (len(cells) - i)),
    )
  return records, failures


_MEAN_FIELDS = (
  'alignment_l1',
  'alignment_ssim',
  'average_drop',
  'average_increase',
  'insertion',
  'deletion',
  'train_images_per_second',
  'wall_seconds',
)


def aggregate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (model, dataset, size, condition): accuracy mean and sample std over
  seeds, the other metrics' means, and the paper's accuracy with our difference."""
  groups: dict[tuple, list[dict]] = {}
  for r in records:
    groups.setdefault((r['model'], r['dataset'], r['image_size'], r['condition']), []).append(r)
  rows = []
  for (model, dataset, size, condition), members in groups.items():
    acc = np.array([m['test_accuracy'] for m in members])
    paper = paper_accuracy(model, dataset, size, condition)
    row = {
      'model': model,
      'dataset': dataset,
      'image_size': size,
      'condition': condition,
      'seeds': len(members),
      'epochs': members[0]['epochs'],
      'accuracy_mean': float(acc.mean()),
      'accuracy_std': float(acc.std(ddof=1)) if len(acc) > 1 else None,
      'paper_accuracy': paper,
      'difference': None if paper is None else float(acc.mean()) - paper,
    }
    for field in _MEAN_FIELDS:
      values = [m[field] for m in members if m.get(field) is not None]
      row[field] = float(np.mean(values)) if values else None
    rows.append(row)
  return rows


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


def comparisons(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per (model, dataset, size) with a baseline and a BCPL row: BCPL (L1 where run) against
  the baseline in accuracy (within one baseline std?), alignment and faithfulness."""
  by_key = {(r['model'], r['dataset'], r['image_size'], r['condition']): r for r in rows}
  out = []
  for (model, dataset, size, condition), base in by_key.items():
    if condition != 'baseline':
      continue
    bcpl = next(
      (
        by_key[(model, dataset, size, c)]
        for c in CONDITIONS[4:]
        if (model, dataset, size, c) in by_key
      ),
      None,
    )
    if bcpl is None:
      continue
    std = base['accuracy_std'] or 0.0
    out.append(
      {
        'model': model,
        'dataset': dataset,
        'image_size': size,
        'bcpl': bcpl['condition'],
        'accuracy_gap': bcpl['accuracy_mean'] - base['accuracy_mean'],
        'accuracy_within_std': bcpl['accuracy_mean'] >= base['accuracy_mean'] - std,
        'alignment_l1': (base['alignment_l1'], bcpl['alignment_l1']),
        'alignment_ssim': (base['alignment_ssim'], bcpl['alignment_ssim']),
        'average_drop': (base['average_drop'], bcpl['average_drop']),
        'insertion': (base['insertion'], bcpl['insertion']),
        'deletion': (base['deletion'], bcpl['deletion']),
      }
    )
  return out


def against_paper(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per (model, dataset, size) of the paper's tables that the grid ran: the paper's best
  condition and accuracy, ours in that condition, our best condition, and a verdict
  (matches = within one seed std, or 0.05 points with one seed)."""
  out = []
  for (model, dataset, size), (condition, paper) in PAPER_BEST.items():
    ran = [r for r in rows if (r['model'], r['dataset'], r['image_size']) == (model, dataset, size)]
    if not ran:
      continue
    same = next((r for r in ran if r['condition'] == condition), None)
    best = max(ran, key=lambda r: r['accuracy_mean'])
    row = same or best
    tolerance = max(row['accuracy_std'] or 0.0, 0.05)
    gap = row['accuracy_mean'] - paper
    verdict = (
      'matches paper' if abs(gap) <= tolerance else 'beats paper' if gap > 0 else 'misses paper'
    )
    out.append(
      {
        'model': model,
        'dataset': dataset,
        'image_size': size,
        'paper_condition': condition,
        'paper_accuracy': paper,
        'ours_same_condition': same,
        'ours_best': best,
        'gap': gap,
        'verdict': verdict,
      }
    )
  return out


def _paper_section(rows: Sequence[dict[str, Any]]) -> list[str]:
  paper = against_paper(rows)
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


def _bcpl_section(rows: Sequence[dict[str, Any]]) -> list[str]:
  pairs = comparisons(rows)
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
  figure_names: Sequence[str],
  failures: dict[str, str],
) -> str:
  """results.md: the grid, every aggregated row next to the paper, BCPL against baseline."""
  blocks = '\n'.join(
    f'- {", ".join(b["models"])} x {", ".join(b["conditions"])} x '
    f'{", ".join(b["datasets"])} at {", ".join(map(str, b["image_sizes"]))} px, seeds '
    f'{", ".join(map(str, b["seeds"]))}, {b["epochs"]} epoch(s)'
    + (f'; overrides {dict(b["overrides"])}' if b.get('overrides') else '')
    for b in grid.blocks
  )
  device = jax.devices()[0]
  lines = [
    f'# Reproduction grid `{grid.name}`',
    '',
    grid.description.strip(),
    '',
    f'Command: `python reproduce.py --grid=configs/grids/{grid.name}.py`. '
    f'Device: {device.platform} ({device.device_kind}), {jax.device_count()} '
    f'device(s), {os.cpu_count()} CPU core(s), JAX {jax.__version__}. Grad-CAM metrics '
    f'on the first {grid.eval.num_images} test images, {grid.eval.n_steps} '
    'insertion/deletion steps, best-validation checkpoint.',
    '',
    'Cells:',
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
  ordered = sorted(
    rows,
    key=lambda r: (r['image_size'], r['dataset'], r['model'], CONDITIONS.index(r['condition'])),
  )
  lines += markdown_table([h for h, _ in _TABLE], [[f(r) for _, f in _TABLE] for r in ordered])
  lines += _paper_section(rows) + _bcpl_section(rows)
  if failures:
    lines += ['', '## Failed cells (rerun the grid to retry them)', '']
    lines += [f'- `{name}`: {error}' for name, error in sorted(failures.items())]
  if figure_names:
    lines += ['', '## Class-mean Grad-CAM against the prototypes: baseline above BCPL', '']
    lines += [f'![{name}]({name})' for name in figure_names]
  return '\n'.join(lines) + '\n'


def _figure(root: str, rows: Sequence[dict[str, Any]], results_dir: str, seed: int) -> list[str]:
  """For each (model, dataset, size) with baseline and BCPL cells, their cam_prototypes.png
  one above the other; returns the written file names."""
  names = []
  for p in comparisons(rows):
    paths = [
      os.path.join(
        root,
        Cell(p['model'], c, p['dataset'], p['image_size'], seed, 0).name,
        'eval',
        'cam_prototypes.png',
      )
      for c in ('baseline', p['bcpl'])
    ]
    if not all(os.path.exists(path) for path in paths):
      continue
    name = f'cam_prototypes_{p["model"]}_{p["dataset"]}_{p["image_size"]}.png'
    figures.save_stacked(
      os.path.join(results_dir, name),
      paths,
      [f'baseline (seed {seed})', f'{p["bcpl"]} (seed {seed})'],
    )
    names.append(name)
  return names


def write_results(
  grid: ml_collections.ConfigDict,
  records: Sequence[dict[str, Any]],
  root: str,
  results_dir: str,
  failures: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
  """Writes results.csv (one row per cell), results.md (listing failed cells, if any) and
  the figures; returns the rows."""
  os.makedirs(results_dir, exist_ok=True)
  rows = aggregate(records)
  fields = [
    'name',
    'model',
    'dataset',
    'image_size',
    'condition',
    'seed',
    'epochs',
    'test_accuracy',
    'checkpoint_step',
    *_MEAN_FIELDS,
    'device',
  ]
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction='ignore')
  writer.writeheader()
  writer.writerows(records)
  io_utils.atomic_write(
    os.path.join(results_dir, 'results.csv'), lambda f: f.write(buffer.getvalue().encode())
  )
  seed = min(r['seed'] for r in records)
  names = _figure(root, rows, results_dir, seed)
  text = render(grid, rows, names, failures or {})
  io_utils.atomic_write(os.path.join(results_dir, 'results.md'), lambda f: f.write(text.encode()))
  return rows
