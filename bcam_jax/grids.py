"""Experiment grids: expansion into cells, the runner, aggregation over seeds.

A grid (``configs/grids/*.py``) is a list of blocks, each the product models x conditions x
datasets x image sizes x seeds with its epochs and config overrides. A cell's config is the
experiment config of its model (a function of the argument ``model=<name>``, e.g.
``configs/experiment.get_config``, passed in by the caller so that this package does not
import ``configs``) under the cell's condition (``bcam_jax.conditions``). Every cell trains
in its own workdir ``<root>/<cell name>`` (``train_lib.train_and_evaluate``, which resumes
from the cell's last checkpoint), is evaluated with Grad-CAM
(``eval_lib.evaluate_and_report`` on the best-validation checkpoint) and then writes
``cell.json``; a cell with a ``cell.json`` is skipped, so an interrupted grid resumes where
it stopped. ``write_results`` aggregates the cells over seeds into ``results.csv`` and
``results.md`` (``report.grid_tables``, next to the paper's Table 1 and 2) and stacks
baseline against BCPL prototype figures.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from bcam_jax import conditions, eval_lib, io_utils, paper_tables, train_lib
from bcam_jax.config_validation import validate_config
from bcam_jax.eval_options import EvalOptions
from bcam_jax.metric_logging import format_duration
from bcam_jax.objective import LossKind
from bcam_jax.report import figures, grid_tables
from bcam_jax.run_spec import RunSpec

# The experiment config: argument 'model=<name>' -> that model's baseline config.
ExperimentConfig = Callable[[str], ml_collections.ConfigDict]
BLOCK_FIELDS = ('models', 'conditions', 'datasets', 'image_sizes', 'seeds', 'epochs')


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


# The eval.py metrics of Grad-CAM each cell records (and the grid averages over seeds).
_GRAD_CAM_FIELDS = (
  'alignment_l1',
  'alignment_ssim',
  'average_drop',
  'average_increase',
  'insertion',
  'deletion',
)


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
      _check_choice(f'block {index} condition', condition, conditions.NAMES)
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


def cell_config(cell: Cell, experiment: ExperimentConfig) -> ml_collections.ConfigDict:
  """The training config of a cell: its model's experiment config under the cell's
  condition, with its dataset, image size, seed and epochs, then the grid's overrides."""
  config = conditions.apply(experiment(f'model={cell.model}'), conditions.get(cell.condition))
  config.data.name = cell.dataset
  config.data.image_size = cell.image_size
  config.seed = cell.seed
  config.train.num_epochs = cell.epochs
  for dotted, value in cell.overrides:
    _set_field(config, dotted, value)
  validate_config(config)
  return config


def eval_options(grid: ml_collections.ConfigDict) -> EvalOptions:
  """What each cell's evaluation measures: the options `grid.eval` sets (its image count,
  an insertion/deletion convention), read as `config.eval` is, over the grids' own
  defaults: Grad-CAM on the best checkpoint, 4 overlays and 4 confusions."""
  grid_defaults = {'methods': ('grad_cam',), 'num_overlays': 4, 'num_error_pairs': 4}
  return EvalOptions.from_config(grid_defaults | grid.eval.to_dict())


def insertion_deletion_convention(grid: ml_collections.ConfigDict) -> str:
  """The grid's insertion/deletion convention in words, per image size when they differ."""
  options = eval_options(grid)
  sizes = sorted({size for block in grid.blocks for size in block['image_sizes']})
  return '; '.join(f'{size} px: {options.insertion_deletion_convention(size)}' for size in sizes)


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
  options: EvalOptions,
  experiment: ExperimentConfig,
  devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
  """Trains (or resumes) and evaluates one cell; returns and writes its ``cell.json``."""
  spec = RunSpec.from_config(cell_config(cell, experiment))
  start = time.time()
  train_lib.train_and_evaluate(spec, workdir, devices)
  metrics = eval_lib.evaluate_and_report(spec, workdir, options, devices)
  grad_cam = metrics['methods']['grad_cam']
  record = dataclasses.asdict(cell) | {
    'name': cell.name,
    'test_accuracy': 100 * metrics['test_accuracy'],
    'checkpoint_step': metrics['step'],
    **{k: grad_cam[k] for k in _GRAD_CAM_FIELDS},
    'train_images_per_second': _train_images_per_second(workdir),
    'wall_seconds': time.time() - start,
    'device': jax.devices()[0].device_kind,
  }
  record['overrides'] = [list(kv) for kv in cell.overrides]
  if jax.process_index() == 0:
    io_utils.write_json(os.path.join(workdir, 'cell.json'), record)
  return record


def run_grid(
  grid: ml_collections.ConfigDict,
  root: str,
  experiment: ExperimentConfig,
  devices: Sequence[jax.Device] | None = None,
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
      record = run_cell(cell, workdir, options, experiment, devices)
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


_MEAN_FIELDS = _GRAD_CAM_FIELDS + ('train_images_per_second', 'wall_seconds')


def aggregate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (model, dataset, size, condition): accuracy mean and sample std over
  seeds, the other metrics' means, and the paper's accuracy with our difference."""
  groups: dict[tuple, list[dict]] = {}
  for r in records:
    groups.setdefault((r['model'], r['dataset'], r['image_size'], r['condition']), []).append(r)
  rows = []
  for (model, dataset, size, condition), members in groups.items():
    acc = np.array([m['test_accuracy'] for m in members])
    paper = paper_tables.accuracy(model, dataset, size, condition)
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


def comparisons(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per (model, dataset, size) with a baseline and a BCPL row: BCPL (L1 where run) against
  the baseline in accuracy (within one baseline std?), alignment and faithfulness."""
  by_key = {(r['model'], r['dataset'], r['image_size'], r['condition']): r for r in rows}
  out = []
  for (model, dataset, size, condition), base in by_key.items():
    if condition != conditions.BASELINE:
      continue
    bcpl = next(
      (
        by_key[(model, dataset, size, c.name)]
        for c in conditions.with_loss(LossKind.BCPL)
        if (model, dataset, size, c.name) in by_key
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
  (matches = within one seed std, or 0.05 points with one seed). Only the paper's
  conditions compete for our best, not the ablations."""
  out = []
  for (model, dataset, size), (condition, paper) in paper_tables.BEST.items():
    ran = [
      r
      for r in rows
      if (r['model'], r['dataset'], r['image_size']) == (model, dataset, size)
      and r['condition'] in conditions.CONDITIONS
    ]
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


def _figure(root: str, pairs: Sequence[dict[str, Any]], results_dir: str, seed: int) -> list[str]:
  """For each (model, dataset, size) with baseline and BCPL cells, their cam_prototypes.png
  one above the other; returns the written file names."""
  names = []
  for p in pairs:
    paths = [
      os.path.join(
        root,
        Cell(p['model'], c, p['dataset'], p['image_size'], seed, 0).name,
        'eval',
        'cam_prototypes.png',
      )
      for c in (conditions.BASELINE, p['bcpl'])
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
  pairs = comparisons(rows)
  names = _figure(root, pairs, results_dir, seed)
  notes = [
    paper_tables.NOT_THE_PAPERS[m]
    for m in sorted({r['model'] for r in rows} & set(paper_tables.NOT_THE_PAPERS))
  ]
  text = grid_tables.render(
    grid,
    rows,
    pairs,
    against_paper(rows),
    names,
    failures or {},
    insertion_deletion_convention(grid),
    model_notes=notes,
  )
  io_utils.atomic_write(os.path.join(results_dir, 'results.md'), lambda f: f.write(text.encode()))
  return rows
